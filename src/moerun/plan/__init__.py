"""`moerun plan`: search the configurations of a model for the fastest that fits a memory budget and keeps
quality (``search``), with routing traces replayed through the expert cache (``trace``)."""
