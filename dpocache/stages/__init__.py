"""Stage one (score) and stage two (train). They never import each other."""
