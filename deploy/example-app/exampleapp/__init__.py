"""A minimal Django project to put behind tlsproxy (see ../docker-compose.yml)."""
