"""teacher_service."""
