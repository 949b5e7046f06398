"""Following NBIA's update feeds: what changed upstream is purged from the cache."""
