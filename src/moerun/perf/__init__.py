"""Performance measurement: the host's roofline and the MoE layer benchmark."""
