"""One router per resource: predict, models, health/ready, metrics."""
