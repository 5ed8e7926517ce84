"""The synthesis config (`synthesize(config)`), embedded in the package so the default run
works from any install; configs/synth_tiny.py wraps it and carries the launch commands.

Every key is documented inline. `config_hash` (records.py) covers `teacher` and `synth` minus
its batching keys: those two sections decide the records, everything else only where they go.
"""

import ml_collections


def synth_tiny() -> ml_collections.ConfigDict:
    """Cold-start synthesis with a tiny teacher on the toy domain (configs/synth_tiny.py)."""
    c = ml_collections.ConfigDict()
    c.stage = "synth"
    c.input = "/tmp/opera_synth_tiny/prompts.jsonl"  # JSONL: id, prompt, reference[, task_type]
    c.write_toy_prompts = 32     # write toy prompt rows to `input` when missing (0: never)
    c.on_bad_row = "skip"        # skip (warn with file:line) | raise
    c.output = "/tmp/opera_synth_tiny/synth.jsonl"  # appended and resumed; + .summary.json
    c.progress = True            # tqdm bar: prompts/s and ETA

    # The teacher: may differ from (be larger than) the student.
    c.teacher = ml_collections.ConfigDict()
    c.teacher.hf_dir = ""        # a local HF Qwen3 directory; "" = random `preset` weights
    c.teacher.preset = "tiny"
    c.teacher.init_seed = 0
    c.teacher.name = ""          # written to each record; "" = hf_dir or "preset:<name>@<seed>"
    c.teacher.dtype = "float32"  # compute (bfloat16 for real teachers)
    c.teacher.param_dtype = ""   # "" = dtype
    c.teacher.attention_impl = ""  # "" = platform default; xla | cudnn | splash

    c.mesh = ml_collections.ConfigDict()
    c.mesh.num_devices = 1       # 1 = one device, no mesh; -1 = all; n = the first n
    c.mesh.data = 1
    c.mesh.fsdp = -1             # -1 = all remaining devices
    c.mesh.tensor = 1

    c.synth = ml_collections.ConfigDict()
    c.synth.guiding_words = ("Wait", "But", "Hmm", "Let me think", "However")
    c.synth.num_candidates = 4   # B per reflective state
    c.synth.max_states = 20      # reflective states, then the teacher finishes to </think>
    c.synth.temperature = 0.6
    c.synth.top_p = 0.95
    c.synth.top_k = 20
    c.synth.max_phase_tokens = 64      # per thinking call (THINK / FINISH)
    c.synth.max_candidate_tokens = 64  # per candidate
    c.synth.max_thinking_tokens = 512  # then the thinking ends ("budget")
    c.synth.max_answer_tokens = 128
    c.synth.after_think = "\n\n"  # after </think> in the answer context ("\n": as published)
    c.synth.seed = 0             # with the prompt id and phase, seeds every sampler row
    c.synth.batch_prompts = 16   # prompts in flight
    c.synth.batch_candidates = True  # B candidates in one call (False: one call each)
    c.synth.rows_per_call = 0    # cap on rows per sampler call; 0 = none
    c.synth.compact = True       # sampler calls go on with only the running rows once half
                                 # have finished (same records, less work; Sampler.sample)
    return c
