"""A morphable face model fitted to the subject's photos by their 68 landmarks (the offline initialisation)."""
