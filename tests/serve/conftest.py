import pytest

from loraforge.config import load_config
from loraforge.training.run import run_training
from tests.conftest import write_tiny_config


@pytest.fixture(scope="session")
def runs(tmp_path_factory, tiny_model_dir):
    """Two short runs on the same tiny base with different learning rates, so their adapters differ."""
    folder = tmp_path_factory.mktemp("serve-runs")
    config_path = write_tiny_config(folder, tiny_model_dir, "{max_steps: 8, batch_size: 4, save_every: null, "
                                                            "eval_every: 1000}", max_new_tokens=6)
    found = []
    for name, rate in (("echo-a", 0.05), ("echo-b", 0.2)):
        config = load_config(config_path, [f"output_dir={folder / name}", f"train.learning_rate={rate}",
                                           "eval.sample_prompts=[]"])
        run_training(config)
        found.append(folder / name)
    return found
