"""How much the policy prefers right answers: log p(right | prompt, images) - log p(wrong | prompt, images).

Pairs (images, prompt, chosen = right, rejected = wrong) go through TRL's own vision preference collator, so the
sequences are exactly the ones DPOTrainer trains on; a pair counts when the right answer has the higher summed
log-probability.
"""

import torch
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference


@torch.no_grad()
def log_prob_margins(model, processor, pairs: list[dict], batch_size: int = 16) -> list[float]:
    """sum log p(chosen) - sum log p(rejected) per pair (rows with `images`, `prompt`, `chosen`, `rejected`)."""
    collator = DataCollatorForVisionPreference(processor)
    model.eval()
    margins = []
    for start in range(0, len(pairs), batch_size):
        batch = collator([dict(pair) for pair in pairs[start:start + batch_size]])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        completion_mask = batch.pop("completion_mask")
        logits = model(**batch, use_cache=False).logits[:, :-1].float()
        targets = batch["input_ids"][:, 1:]
        token_logps = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
        logps = (token_logps * completion_mask[:, 1:]).sum(-1)
        chosen, rejected = logps.chunk(2)
        margins += (chosen - rejected).cpu().tolist()
    return margins


def preference_accuracy(model, processor, pairs: list[dict], batch_size: int = 16) -> dict:
    margins = log_prob_margins(model, processor, pairs, batch_size)
    return {"accuracy": round(sum(m > 0 for m in margins) / len(margins), 4),
            "mean_margin": round(sum(margins) / len(margins), 4)}
