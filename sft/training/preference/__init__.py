"""Preference training: pairs (or unpaired examples) in batches, their answers' log-probabilities,
the losses by name, and the metrics logged beside them.

collate.py  the two sequences each record scores, batched packed or padded (PairCollator)
logps.py    the summed log-probability of each answer, through the supervised-only head
losses.py   the registry: one function per loss (DPO's sigmoid, IPO, hinge, SimPO, ORPO, KTO),
            each with its options, whether it needs the reference model and paired data
metrics.py  what training logs beside the loss, as sums added up over micro-batches
"""
