"""What people and services see: pages, forms, the HTTP API, the admin, the dashboard, health and metrics."""
