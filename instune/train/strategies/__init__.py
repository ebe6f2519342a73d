"""How gradients are synchronised across workers: DDP (ddp.py) or DeepSpeed ZeRO (deepspeed.py)."""
