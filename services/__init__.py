"""Service processes and the glm command line."""
