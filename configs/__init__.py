"""ml_collections model configs: flash, pro, flash_base, pro_base, tiny, demo (the shipped trained toy model)."""
