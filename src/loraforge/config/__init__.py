from loraforge.config.load import config_to_yaml, load_config, write_resolved
from loraforge.config.schema import RunConfig

__all__ = ["RunConfig", "config_to_yaml", "load_config", "write_resolved"]
