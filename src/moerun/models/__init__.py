"""Model integration: transformers MoE blocks -> MoELayer, the "moerun" experts implementation, patch()."""
