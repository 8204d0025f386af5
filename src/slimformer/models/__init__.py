"""Model loading (aliases, local folders, compressed artifacts) and architecture layout."""
