"""ScheInfer's OpenAI-compatible HTTP server (FastAPI). Entry points: create_app, serve, load_settings."""
