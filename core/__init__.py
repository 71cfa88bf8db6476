"""Small libraries every app may use. `core` imports no app of the project."""
