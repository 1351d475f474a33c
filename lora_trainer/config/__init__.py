"""The run's settings: config_schema.json checks (schema.py) and the cross-field rules that make one frozen
TrainConfig (config.py). Torch-free."""
