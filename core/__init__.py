"""The ground floor: pure rules and formats. Nothing here imports Django."""
