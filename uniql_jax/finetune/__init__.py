"""Stage 3: masked LoRA fine-tuning over the nested pruning masks of a sorted model.

lora.py   the pure core: adapters, merge, masked loss, rate sampling, one optimizer step
train.py  the driver: batches, the loop, evaluation per rate, selection, resume checkpoints
data.py   the fine-tuning text: Alpaca-style records, the held-out split
"""
