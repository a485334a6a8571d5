"""Side-by-side benchmark of tlsproxy against nginx, HAProxy and stock twisted.web.proxy.

Run it with ``bench/run`` (installs what it needs) or ``python -m bench``; see
README.md's Performance section.  Nothing here is imported by tlsproxy.
"""

__all__: list[str] = []
