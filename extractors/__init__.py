"""Image -> region features. Knows nothing of files, stores or DVC."""
