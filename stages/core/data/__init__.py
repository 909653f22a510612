"""What cached samples go through on their way to a stage: the int8 codec on tensors, the validation split,
and the rules that choose which samples are worth encoding."""
