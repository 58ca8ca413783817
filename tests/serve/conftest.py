import pytest

from loraforge.config import load_config
from loraforge.training.run import run_training
from tests.conftest import save_tiny_llama, write_tiny_config


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


@pytest.fixture(scope="session")
def odd_runs(tmp_path_factory, tiny_model_dir, tokenizer):
    """One-step runs on the echo runs' base, or beside it, that differ from them by one thing each."""
    folder = tmp_path_factory.mktemp("vllm-odd")
    config_path = write_tiny_config(folder, tiny_model_dir, "{max_steps: 1, batch_size: 4, save_every: null, "
                                                            "eval_every: 1000}")
    other_base = save_tiny_llama(folder / "model-1", tokenizer, seed=1)
    template = tokenizer.chat_template
    tokenizer.chat_template = template.replace("SmolLM", "Tiny")
    assert tokenizer.chat_template != template, "the other template's default system prompt names another model"
    try:
        other_template = save_tiny_llama(folder / "model-2", tokenizer, seed=2)
    finally:
        tokenizer.chat_template = template
    found = {}
    for name, settings in (("dora", ["lora.use_dora=true"]), ("system", ["data.system_prompt=Answer briefly."]),
                           ("on-other-base", [f"model.name={other_base}"]),
                           ("other-template", [f"model.name={other_template}"]), ("full", ["adapter=full"]),
                           ("biases", ["lora.bias=all"]), ("layers-dropped", ["model.variant=drop_layers",
                                                                            "model.drop_layers=[1]"])):
        run_training(load_config(config_path, [f"output_dir={folder / name}", "eval.sample_prompts=[]", *settings]))
        found[name] = folder / name
    return found
