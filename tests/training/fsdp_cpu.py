"""Started by torchrun from test_scale_out.py, two CPU processes over gloo: what accelerate makes of an FSDP2 plugin
on CPU, and three AdamW steps of a LoRA model sharded by torch's fully_shard itself. Rank 0 writes the findings.

    python -m torch.distributed.run --nproc-per-node 2 tests/training/fsdp_cpu.py MODEL_DIR RESULT.json"""

import json
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

model_dir, result = sys.argv[1], sys.argv[2]
accelerator = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
full_rows = model.get_input_embeddings().weight.shape[0]
model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
for layer in model.base_model.model.model.layers:
    fully_shard(layer)
fully_shard(model)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(dist.get_rank()))
losses = []
for _ in range(3):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    total = loss.detach().clone()
    dist.all_reduce(total)
    losses.append(total.item() / dist.get_world_size())
embedding = model.get_input_embeddings().weight
lora_b_moved = bool(next(p for name, p in model.named_parameters() if "lora_B" in name).full_tensor().abs().sum() > 0)
if dist.get_rank() == 0:
    with open(result, "w", encoding="utf-8") as out:
        json.dump({"accelerate_distributed_type": str(accelerator.distributed_type.value),
                   "accelerate_fsdp_plugin": getattr(accelerator.state, "fsdp_plugin", None) is not None,
                   "embedding_rows_here": embedding.to_local().shape[0], "embedding_rows": full_rows,
                   "embedding_type": type(embedding).__name__,
                   "lora_b_moved": lora_b_moved, "losses": losses}, out)
dist.destroy_process_group()
