"""Running a model: the runners (lean and transformers), generation, evaluation, routing statistics."""
