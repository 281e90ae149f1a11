#!/usr/bin/env python3
"""Builds rows.jsonl from raw table transcriptions (raw/*.md, raw/metamath.jsonl) and
hand-typed small tables. Every number here was read from the cited source; nothing estimated."""
import json, os, re
HERE = os.path.dirname(os.path.abspath(__file__))
RAW = os.path.join(HERE, "raw")
rows = []

def add(**kw):
    base = dict(source=None, gpu=None, versions={}, model=None, mode=None, precision=None,
                optimizer=None, batch=None, seq=None, new_tokens=None, padding=None, grad_ckpt=None,
                attention=None, lora=None, quantization=None, sharding=None, metric=None,
                metric_evidence=None, value=None, unit=None, unit_note=None, gaps=[])
    base.update(kw)
    rows.append(base)

def parse_md(fn):
    out = []
    for line in open(os.path.join(RAW, fn)):
        line = line.strip()
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        out.append((line, cells))
    return out

def num(s):
    s = s.strip()
    if s in ("OOM", "/", "-", ""):
        return None
    return float(s)

# ---------------------------------------------------------------- transformers SDPA tables
TRAIN_EVID = ("benchmark script (fxmarty gist benchmark_sdpa_training, https://gist.github.com/fxmarty/7e75cc3942d6974e4849093ebea0a331, "
              "and derived copies in the code index): `torch.cuda.reset_peak_memory_stats(device)` + `torch.cuda.empty_cache()` after 10 warmup "
              "steps, then 100x [model.zero_grad(); outputs = model(**inputs); loss = outputs.logits.sum(); loss.backward()], then "
              "`max_memory = torch.cuda.max_memory_allocated(device)`; reported as `eager_max_mem = ... * 1e-6` under header 'Eager peak mem (MB)'")
INFER_EVID = ("benchmark script (fxmarty gist benchmark_sdpa_inference, https://gist.github.com/fxmarty/5113e4304fbdd38c9c3702ce44683f6a, copy in "
              "code index id 31209750363): warmup call, then `torch.cuda.reset_peak_memory_stats(device)`, num_batches x [model.generate(...) if "
              "is_decoder else model(input_ids, masks)] under torch.inference_mode(), then `max_memory = torch.cuda.max_memory_allocated(device)`; "
              "reported as `max_mem_eager * 1e-6` under 'Mem eager (MB)' / 'Mem BT (MB)' (BT column = SDPA run)")
UNIT_NOTE = "MB = 1e6 bytes (script multiplies bytes by 1e-6)"

TF = {
 "gpt2": dict(path="docs/source/en/model_doc/gpt2.md", content_id="785763452",
              alt=["https://github.com/huggingface/transformers/pull/31172 (vasqu comment 2024-06-01, same training table)"],
              gpu="rtx3080ti-16GB", versions={"torch":"2.2.1","transformers":None,"os":"Ubuntu 22.04"},
              model="openai-community/gpt2-large", arch="GPT2LMHeadModel",
              train=("gpt2_train.md","### Training",0,1,5,6), infer=("gpt2_infer.md","### Inference",0,1,5,6),
              text="On a local benchmark (rtx3080ti-16GB, PyTorch 2.2.1, OS Ubuntu 22.04) using `float16` with [gpt2-large](https://huggingface.co/openai-community/gpt2-large)"),
 "pythia": dict(path="docs/source/en/model_doc/gpt_neox.md", content_id="157445880 (same table also in content ids 32750555100, 19756224329)",
              alt=["https://github.com/huggingface/transformers/pull/31031 (PR description: 'Added benchmarks based on @fxmarty scripts @ training ... and inference ...')"],
              gpu="rtx3080ti-16GB", versions={"torch":"2.2.1","transformers":None,"os":"Ubuntu 22.04"},
              model="EleutherAI/pythia-410m-deduped", arch="GPTNeoXForCausalLM",
              train=("pythia_train.md","### Training",0,1,5,6), infer=("pythia_infer.md","### Inference",0,1,5,6),
              text="On a local benchmark (rtx3080ti-16GB, PyTorch 2.2.1, OS Ubuntu 22.04) using `float16` with [pythia-410m-deduped]"),
 "opt": dict(path="docs/source/en/model_doc/opt.md", content_id="736816521",
              alt=["https://github.com/huggingface/transformers/pull/33298 (comment 2024-09-25: 'used code from here https://github.com/huggingface/transformers/pull/31031')"],
              gpu="L40S-45GB", versions={"torch":"2.4.0","transformers":None,"os":"Debian GNU/Linux 11"},
              model="facebook/opt-350m", arch="OPTForCausalLM",
              train=("opt_train.md","### Training",0,1,5,6), infer=("opt_infer.md","### Inference",0,1,5,6),
              text="On a local benchmark (L40S-45GB, PyTorch 2.4.0, OS Debian GNU/Linux 11) using `float16` with [facebook/opt-350m]"),
 "biogpt": dict(path="docs/source/en/model_doc/biogpt.md", content_id="32272478471 (also 672407519)", alt=[],
              gpu="NVIDIA GeForce RTX 2060-8GB", versions={"torch":"2.3.1","transformers":None,"os":"Ubuntu 20.04"},
              model="microsoft/biogpt", arch="BioGptForCausalLM (training, 'with a CausalLM head'); inference 'with a simple AutoModel head' (BioGptModel)",
              train=("biogpt_train.md","training table (no heading) after 'we saw the following speedups during training'",1,2,7,8),
              infer=("biogpt_infer.md","inference table after 'with a simple AutoModel head, we saw the following speedups during inference'",1,2,9,10),
              text="On a local benchmark (NVIDIA GeForce RTX 2060-8GB, PyTorch 2.3.1, OS Ubuntu 20.04) with `float16` and `microsoft/biogpt` model"),
 "distilbert": dict(path="docs/source/en/model_doc/distilbert.md", content_id="3466801764 (also 516609148, 32541174878)", alt=[],
              gpu="NVIDIA GeForce RTX 2060-8GB", versions={"torch":"2.3.1","transformers":None,"os":"Ubuntu 20.04"},
              model="distilbert-base-uncased", arch="DistilBertForMaskedLM ('with a MaskedLM head')",
              train=("distilbert_train.md","#### Training",1,2,7,8), infer=("distilbert_infer.md","#### Inference",1,2,9,10),
              text="On a local benchmark (NVIDIA GeForce RTX 2060-8GB, PyTorch 2.3.1, OS Ubuntu 20.04) with `float16` and the `distilbert-base-uncased` model with a MaskedLM head"),
 "bert": dict(path="docs/source/en/model_doc/bert.md", content_id="32272864776", 
              alt=["https://github.com/huggingface/transformers/pull/28802 (PR: 'using BertLMHeadModel', 'Training benchmark based on fxmarty's script'); gists hackyon/2bfcfb59666fab23655f6e62bc0752ba (training) and hackyon/c3d829d06144b98c6b092a66733fa1a9 (inference)"],
              gpu="A100-80GB", versions={"torch":"2.2.0","transformers":None,"os":"Ubuntu 22.04"},
              model="bert-base-uncased", arch="BertLMHeadModel (training, per PR #28802); inference class not stated",
              train=("bert_train.md","#### Training",0,1,5,6), infer=("bert_infer.md","#### Inference",0,1,5,6),
              text="On a local benchmark (A100-80GB, CPUx12, RAM 96.6GB, PyTorch 2.2.0, OS Ubuntu 22.04) with `float16`"),
 "albert": dict(path="docs/source/en/model_doc/albert.md", content_id="32201354665",
              alt=["https://github.com/huggingface/transformers/pull/32092 (inference table 'using GeForce RTX 2060 with 8GB')"],
              gpu="GeForce RTX 2060-8GB", versions={"torch":"2.3.1","transformers":None,"os":"Ubuntu 20.04"},
              model="albert/albert-base-v2 (benchmark-script default; the doc text does not name the checkpoint, the doc code snippet shows albert/albert-base-v1)", arch="AlbertForMaskedLM (training script default class) / AlbertForSequenceClassification (inference script)",
              train=("albert_train.md","#### Training for 100 iterations",0,1,5,6), infer=("albert_infer.md","#### Inference with 50 batches",0,1,5,6),
              text="On a local benchmark (GeForce RTX 2060-8GB, PyTorch 2.3.1, OS Ubuntu 20.04) with `float16`"),
}
DECODERS = {"gpt2","pythia","opt"}
for key, d in TF.items():
    for phase in ("train","infer"):
        fn, section, ib, isq, ie, isd = d[phase]
        for line, cells in parse_md(fn):
            bs = int(cells[ib]); sq = int(cells[isq])
            for attn, idx in (("eager", ie), ("sdpa", isd)):
                v = num(cells[idx])
                gaps = ["transformers version not stated", "commit of the docs file not resolvable through the index (content id given)"]
                if phase == "train":
                    mode = "forward-backward-no-optimizer"
                    gaps += ["exact copy of the fxmarty training gist not fully readable (docs corpus shows the first part incl. `loss = outputs.logits.sum()`; memory call taken from derived copies in the code index)",
                             "whether an attention_mask of ones was passed is not stated (derived copies differ: one passes torch.ones mask, the distilbert copy has it commented out)",
                             "model in train() mode: dropout active where config dropout > 0"]
                    pad = "no padding: random token ids of exactly seq_len (torch.randint(vocab_size - 1, (batch_size, sequence_length)))"
                    newt = None
                    precision = "float16 weights (from_pretrained(torch_dtype=torch.float16) with --use-half), no autocast, no grad scaler"
                    opt = "none (no optimizer step; model.zero_grad() each step)"
                    ev = TRAIN_EVID
                else:
                    if key in DECODERS:
                        mode = "inference-generate (inferred: per-token latencies of ~7-20 ms imply model.generate with --is_decoder)"
                        newt = 100
                        gaps += ["new_tokens not printed in the table: 100 is the script default --max_token (min_new_tokens=max_new_tokens=max_token, eos disabled)",
                                 "--is_decoder / --use-mask flags used are not printed; generate path inferred from latency magnitude"]
                    else:
                        mode = "inference-forward"
                        newt = None
                        gaps += ["head class used in the inference run not stated for certain (script picks AutoModel for non-generation tasks)"]
                    pad = "random token ids in [0,5) of exactly seq_len; attention mask all ones except mask[0,0]=0 (one masked position); mask=None when --use-mask not set and bs==1"
                    precision = "float16 (script casts hf_model.to(torch.float16) when --use-cuda)"
                    opt = None
                    ev = INFER_EVID
                if v is None:
                    gaps = gaps + ["value printed as OOM"]
                add(source=dict(repo="huggingface/transformers", path=d["path"], commit=None, index_content_id=d["content_id"],
                                also_published_in=d["alt"], table=f"Using Scaled Dot Product Attention (SDPA) > {section}",
                                row_label=line, column=("Eager" if attn=="eager" else "SDPA") + (" peak mem (MB)" if phase=="train" else " mem (MB)"),
                                setup_text=d["text"]),
                    gpu=d["gpu"], versions=d["versions"], model=d["model"], architecture=d["arch"], mode=mode, precision=precision,
                    optimizer=opt, batch=bs, seq=sq, new_tokens=newt, padding=pad, grad_ckpt=False if phase=="train" else None,
                    attention=attn, lora=None, quantization=None, sharding="single GPU",
                    metric="max_memory_allocated", metric_evidence=ev, value=v, oom=(v is None), unit="MB", unit_note=UNIT_NOTE, gaps=gaps)

# ---------------------------------------------------------------- optimum GPTQ benchmark
OPT_SRC = dict(repo="huggingface/optimum", path="tests/benchmark/README.md", commit="11e71e260c7c8f7e6773da1f473d90b9836e9f89")
OPT_EVID = ("tests/benchmark/benchmark_gptq.py @11e71e260c7c8f7e6773da1f473d90b9836e9f89: `torch.cuda.reset_peak_memory_stats()` before each config; "
            "inside memory_tracker.track() (nvidia-smi --query-gpu=memory.used polled every 0.1 s, MiB*1.048576): warmup generate + one generate; then "
            "`peak_allocated_torch_mb = memory_stats['allocated_bytes.all.peak'] * 1e-6`, `peak_reserved_torch_mb = memory_stats['reserved_bytes.all.peak'] * 1e-6`, "
            "`peak_external_mb = peak_nvml_mb - peak_reserved_torch_mb`, `peak_memory_mb = peak_allocated_torch_mb + peak_external_mb`")
opt_gen = {  # batch -> list of (label, quant, kernel, value)
 1:[("None","fp16",None,29152.98),("gptq exllamav2","gptq",'exllamav2',11313.75),("gptq exllama","gptq","exllama",10484.34),("gptq autogptq-cuda-old","gptq","autogptq-cuda-old",10344.62),("bitsandbytes","bnb-fp4",None,11018.36)],
 2:[("None","fp16",None,30831.09),("gptq exllamav2","gptq","exllamav2",12112.42),("gptq exllama","gptq","exllama",12162.43),("gptq autogptq-cuda-old","gptq","autogptq-cuda-old",12020.34),("bitsandbytes","bnb-fp4",None,12834.84)],
 4:[("None","fp16",None,34187.22),("gptq exllamav2","gptq","exllamav2",16387.19),("gptq exllama","gptq","exllama",15518.55),("gptq autogptq-cuda-old","gptq","autogptq-cuda-old",15374.67),("bitsandbytes","bnb-fp4",None,16187.69)],
 8:[("None","fp16",None,40327.62),("gptq exllamav2","gptq","exllamav2",22463.02),("gptq exllama","gptq","exllama",21864.56),("gptq autogptq-cuda-old","gptq","autogptq-cuda-old",20987.68),("bitsandbytes","bnb-fp4",None,22894.02)],
 16:[("None","fp16",None,53986.51),("gptq exllamav2","gptq","exllamav2",35740.95),("gptq exllama","gptq","exllama",34777.04),("gptq autogptq-cuda-old","gptq","autogptq-cuda-old",35497.62),("bitsandbytes","bnb-fp4",None,35532.37)],
}
opt_pre = {
 1:[("None","fp16",None,27999.54),("gptq exllamav2","gptq","exllamav2",10260.35),("gptq exllama","gptq","exllama",9330.89),("gptq autogptq-cuda-old","gptq","autogptq-cuda-old",9474.19),("bitsandbytes","bnb-fp4",None,9952.65)],
 2:[("None","fp16",None,28524.37),("gptq exllamav2","gptq","exllamav2",10783.60),("gptq exllama","gptq","exllama",9855.71),("gptq autogptq-cuda-old","gptq","autogptq-cuda-old",9928.23),("bitsandbytes","bnb-fp4",None,10421.89)],
 4:[("None","fp16",None,29574.01),("gptq exllamav2","gptq","exllamav2",11829.59),("gptq exllama","gptq","exllama",10905.35),("gptq autogptq-cuda-old","gptq","autogptq-cuda-old",10838.42),("bitsandbytes","bnb-fp4",None,11440.08)],
 8:[("None","fp16",None,31673.30),("gptq exllamav2","gptq","exllamav2",13920.50),("gptq exllama","gptq","exllama",13004.64),("gptq autogptq-cuda-old","gptq","autogptq-cuda-old",12862.18),("bitsandbytes","bnb-fp4",None,13539.37)],
 16:[("None","fp16",None,35871.88),("gptq exllamav2","gptq","exllamav2",18104.44),("gptq exllama","gptq","exllama",17203.22),("gptq autogptq-cuda-old","gptq","autogptq-cuda-old",17060.76),("bitsandbytes","bnb-fp4",None,17737.95)],
}
for phase, table, newt, mode, colname in (("gen", opt_gen, 512, "inference-generate", "Peak memory (MB)"),
                                         ("prefill", opt_pre, 1, "inference-prefill (generate with 1 new token)", "Max memory (MB)")):
    for bs, entries in table.items():
        for label, q, kernel, v in entries:
            if q == "fp16":
                model = "meta-llama/Llama-2-13b-chat-hf (README command at this commit; the earlier README @096386299309ec9c4c737c9e5ce260008c48fad7 shows the same fp16 numbers with daryl149/llama-2-13b-chat-hf)"
                quant = None; prec = "float16"
            elif q == "gptq":
                model = "TheBloke/Llama-2-13B-chat-GPTQ"; prec = "int4 weights / float16 compute"
                quant = dict(method="GPTQ", bits=4, group_size=128, act_order=False, kernel=kernel)
            else:
                model = "meta-llama/Llama-2-13b-chat-hf"; prec = "4-bit fp4 weights / float16 compute"
                quant = dict(method="bitsandbytes", bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype="float16", kernel=None)
            gaps = ["attention implementation not stated (transformers 4.35 default)",
                    "metric is a hybrid (torch peak allocated + non-PyTorch memory estimated from nvidia-smi minus torch peak reserved), not a plain torch counter; script prints 'WARNING: The reported peak memory is only a rough estimate'",
                    "CUDA/driver version not stated"]
            if q == "fp16":
                gaps.append("fp16 baseline numbers (load time 26.0 s) were carried over from an earlier run/script version (see older README), versions of that run not stated")
            add(source=dict(**OPT_SRC, table=("GPTQ benchmark > Generation benchmark results" if phase=="gen" else "GPTQ benchmark > Prefill-only benchmark results") + f" > Batch size = {bs}",
                            row_label=label, column=colname),
                gpu="NVIDIA A100-SXM4-80GB (single)", versions={"torch":"2.0.1","transformers":"4.35","auto-gptq":"0.5.0","bitsandbytes":"0.41.1"},
                model=model, architecture="LlamaForCausalLM", mode=mode, precision=prec, optimizer=None, batch=bs, seq=512, new_tokens=newt,
                padding="no padding: random ids torch.randint(1, vocab_size-1, (batch_size, prompt_length)), attention mask all ones",
                grad_ckpt=None, attention=None, lora=None, quantization=quant, sharding="single GPU (device_map='auto' for quantized loads)",
                metric="other: allocated_bytes.all.peak + (nvidia-smi peak - reserved_bytes.all.peak)", metric_evidence=OPT_EVID,
                value=v, oom=False, unit="MB", unit_note="MB = 1e6 bytes (`* 1e-6`; nvidia-smi MiB converted with *1.048576)", gaps=gaps)

# ---------------------------------------------------------------- torchtune README
TT_SRC = dict(repo="pytorch/torchtune", path="README.md", commit=None, index_content_id="214345278 (also 29167378087)")
TT_EVID = ("README column 'Peak Memory Active (GiB)'; torchtune.training.get_memory_stats (torchtune/training/memory.py @033177875786d2530912185c5c7ceccaadd1d615): "
           "`peak_memory_active = torch_device.memory_stats().get(\"active_bytes.all.peak\", 0) / (1024**3)` (also logs peak_memory_alloc = max_memory_allocated and peak_memory_reserved)")
ladder = [("Baseline",25.5),("+ Packed Dataset",60.0),("+ Compile",51.0),("+ Chunked Cross Entropy",42.9),("+ Activation Checkpointing",24.9),
          ("+ Fuse optimizer step into backward",23.1),("+ Activation Offloading",21.8),("+ 8-bit AdamW",17.6),("LoRA",8.5),("QLoRA",4.6)]
cum = {"packed":False,"compile":False,"chunked_ce":False,"ac":False,"opt_in_bwd":False,"act_offload":False,"adamw8bit":False}
for label, v in ladder:
    mode = "full"; lora=None; quant=None; opt="AdamW (implied: '+ 8-bit AdamW' is added later; baseline optimizer not printed)"
    if label == "+ Packed Dataset": cum["packed"]=True
    if label == "+ Compile": cum["compile"]=True
    if label == "+ Chunked Cross Entropy": cum["chunked_ce"]=True
    if label == "+ Activation Checkpointing": cum["ac"]=True
    if label == "+ Fuse optimizer step into backward": cum["opt_in_bwd"]=True
    if label == "+ Activation Offloading": cum["act_offload"]=True
    if label == "+ 8-bit AdamW": cum["adamw8bit"]=True; opt="8-bit AdamW (implementation not printed; torchtune full config default is bitsandbytes.optim.PagedAdamW8bit), fused into backward"
    flags = dict(cum)
    if cum["opt_in_bwd"] and label not in ("LoRA","QLoRA") and not cum["adamw8bit"]:
        opt = "AdamW (implied), optimizer_in_bwd=True"
    if label in ("LoRA","QLoRA"):
        flags["opt_in_bwd"]=False; flags["adamw8bit"]=False
        opt = "torch.optim.AdamW (reproduce command: optimizer=torch.optim.AdamW, optimizer_in_bwd=False)"
        mode = "lora" if label=="LoRA" else "qlora"
        lora = dict(rank=64, alpha=128, targets=["q_proj","v_proj","output_proj","MLP (apply_lora_to_mlp=True)"], source="recipes/configs/llama3_2/3B_lora_single_device.yaml / 3B_qlora_single_device.yaml (current stored versions; not pinned to README commit)")
        if label=="QLoRA": quant = dict(method="torchtune NF4 base weights (qlora_llama3_2_3b)")
    add(source=dict(**TT_SRC, table="Optimization flags (Llama 3.2 3B, techniques applied sequentially)", row_label=label, column="Peak Memory Active (GiB)"),
        gpu="A100 (memory size not stated)", versions={"torch":None,"torchtune":None,"note":"README snapshot says torchtune is tested with latest stable PyTorch (currently 2.6.0)"},
        model="meta-llama/Llama-3.2-3B-Instruct (configs download this; README says 'Llama 3.2 3B')", architecture="LlamaForCausalLM (torchtune llama3_2_3b)",
        mode=mode, precision="bf16 (full bf16 weights, no fp32 master copy)", optimizer=opt, batch=2, seq=4096, new_tokens=None,
        padding=("packed to max_seq_len 4096" if flags["packed"] else "unpacked alpaca samples, padded per batch, truncated at max_seq_len 4096"),
        grad_ckpt=flags["ac"], attention="torchtune default (SDPA via torch.nn.functional.scaled_dot_product_attention)", lora=lora, quantization=quant,
        sharding="single device", metric="other: active_bytes.all.peak (torchtune 'peak_memory_active')", metric_evidence=TT_EVID, value=v, oom=False,
        unit="GiB", unit_note="GiB = 2^30 bytes in current memory.py; some older torchtune versions divided by 1e9 (not resolvable for the README run)",
        flags=flags, gaps=["torchtune version/commit used for the run not stated", "A100 40GB vs 80GB not stated", "baseline optimizer and loss not printed (loss for baseline presumably standard CE; chunked CE added in row 4)",
                           "dataset not printed for the ladder (alpaca in configs; QLoRA command uses default dataset of 3B_qlora_single_device)", "commit of README not resolvable (content id given)"])
tt31 = [("Llama 3.1 8B","Full finetune","1x 4090",18.9,"GiB"),("Llama 3.1 8B","Full finetune","1x A6000",37.4,"GiB"),("Llama 3.1 8B","LoRA","1x 4090",16.2,"GiB"),
        ("Llama 3.1 8B","LoRA","1x A6000",30.3,"GiB"),("Llama 3.1 8B","QLoRA","1x 4090",7.4,"GiB"),("Llama 3.1 70B","Full finetune","8x A100",13.9,"GiB"),
        ("Llama 3.1 70B","LoRA","8x A100",27.6,"GiB"),("Llama 3.1 405B","QLoRA","8x A100",44.8,"GB")]
for m, meth, hw, v, u in tt31:
    g = ["which memory counter ('Peak Memory per GPU') is not stated", "configs/optimizer/LoRA rank not stated in the table", "torch/torchtune versions not stated"]
    if m=="Llama 3.1 70B" and meth=="Full finetune": g.append("'**= Uses CPU offload with fused optimizer'")
    if u=="GB": g.append("unit printed as GB for this row (others GiB); unclear whether 1e9 or 2^30")
    add(source=dict(repo="pytorch/torchtune", path="README.md", commit="0031bfb080bd35ec533c412df883cf2bf7bf7fe4", table="Memory and training speed",
                    row_label=f"| {m} | {meth} | {hw} |", column="Peak Memory per GPU"),
        gpu=hw, versions={"torch":None}, model=m, mode={"Full finetune":"full","LoRA":"lora","QLoRA":"qlora"}[meth], precision="bf16 (torchtune default)",
        optimizer=None, batch=2, seq=2048, padding="dataset packed to sequence length 2048", grad_ckpt=None, attention=None,
        sharding=("FSDP across 8 GPUs" if hw.startswith("8x") else "single GPU"), metric="unknown",
        metric_evidence="README note: 'all the below numbers are provided for batch size 2 (without gradient accumulation), a dataset packed to sequence length 2048, and torch compile enabled'",
        value=v, oom=False, unit=u, gaps=g)

# ---------------------------------------------------------------- torchao low-bit optimizers
AO_EVID = ("benchmarks/benchmark_low_bit_adam.py @03cf0adec63fdbae2fd6d2aa7688b52ee8c64004 (script linked from the README): "
           "`print(f\"Max memory used: {torch.cuda.max_memory_allocated() / 1e9:.02f} GB\")` at end of training (+eval) run")
AO_SRC = dict(repo="pytorch/ao", path="torchao/optim/README.md", commit="072500abcfbdec15a429eb53160c63fb92534b85")
for label, v in [("PyTorch (fused)",12.23),("bnb 8-bit",8.32),("ao 8-bit",8.33),("ao FP8 E4M3",8.33),("lpmm 4-bit",7.72),("ao 4-bit",7.72),("lpmm 4-bit (*)",7.74)]:
    add(source=dict(**AO_SRC, table="Benchmarks > ViT-H fine-tune on resisc45", row_label=label, column="Peak memory allocated (GB)"),
        gpu="4070Ti SUPER", versions={"torch":"2.4"}, model="timm/vit_huge_patch14_224.orig_in21k (630M params)", mode="full", precision="BF16 AMP (fp32 weights)",
        optimizer=f"AdamW: {label}", batch=8, seq=None, grad_ckpt=False, attention=None, sharding="single GPU", metric="max_memory_allocated",
        metric_evidence=AO_EVID, value=v, oom=False, unit="GB", unit_note="GB = 1e9 bytes (`/ 1e9`)",
        gaps=["vision model (not an LLM)", "compiled model; image size 224 (RandomResizedCrop(224) in script)"])
for label, v in [("PyTorch (fused)",51.6),("bnb 8-bit",39.3),("ao 8-bit",39.1),("ao 4-bit",33.2)]:
    add(source=dict(**AO_SRC, table="Benchmarks > Llama2-7B on Alpaca (torchtune 52d1b838)", row_label=label, column="Peak memory allocated (GB)"),
        gpu="A100", versions={"torch":"2.4","torchtune":"52d1b838c1c35b5e75fddf8776be400adc36dff5"}, model="meta-llama/Llama-2-7b", mode="full",
        precision="full BF16", optimizer=f"AdamW: {label}", batch=None, seq=None, grad_ckpt=None, attention=None, sharding="single GPU",
        metric="max_memory_allocated",
        metric_evidence="README column 'Peak memory allocated (GB)'; run with torchtune 52d1b838 whose memory logger reports peak_memory_alloc = torch.cuda.max_memory_allocated(device) (divisor 1e9 in older torchtune utils/memory.py copies in the index, e.g. content id 152079646)",
        value=v, oom=False, unit="GB", unit_note="likely 1e9 bytes (older torchtune divided by 1e9); not verifiable at 52d1b838",
        gaps=["batch size, seq len, activation checkpointing, recipe config not stated in README (see pytorch/ao PR #812)", "A100 40/80GB not stated"])
for label, v in [("None",9.82),("DeepSpeed ZeRO-Offload",6.85),("ao",5.24),("ao (offload gradients)",4.01)]:
    add(source=dict(**AO_SRC, table="Optimizer CPU offload benchmark", row_label=label, column="Max memory"),
        gpu="4070Ti SUPER (16GB VRAM)", versions={"torch":None}, model="timm/vit_giant_patch14_dinov2.lvd142m (1.1B params)", mode="full", precision="full BF16",
        optimizer=f"Adam, offload: {label}", batch=32, seq=None, grad_ckpt=True, attention=None, sharding="single GPU",
        metric="max_memory_allocated", metric_evidence=AO_EVID, value=v, oom=False, unit="GB", unit_note="GB = 1e9 bytes",
        gaps=["vision model", "eager mode", "torch version not stated for this table", "same table also in torchao/prototype/low_bit_optim/README.md @03cf0ade"])
for cfg, off, v in [("Full BF16, compiled","None",9.90),("Full BF16, compiled","ao",5.33),("BF16 AMP, eager","None",None),("BF16 AMP, eager","ao",9.90)]:
    add(source=dict(**AO_SRC, table="Optimizer CPU offload > Ablations on AMP and torch.compile()", row_label=f"{cfg} | {off}", column="Max memory"),
        gpu="4070Ti SUPER (16GB VRAM)", versions={"torch":None}, model="timm/vit_giant_patch14_dinov2.lvd142m (1.1B params)", mode="full",
        precision=cfg, optimizer=f"Adam, offload: {off}", batch=32, grad_ckpt=True, sharding="single GPU", metric="max_memory_allocated",
        metric_evidence=AO_EVID, value=v, oom=(v is None), unit="GB", unit_note="GB = 1e9 bytes",
        gaps=["vision model", "batch 32 / AC assumed same as the preceding benchmark paragraph"] + (["value printed as OOM"] if v is None else []))
for label, v in [("PyTorch",12.94),("bnb 8-bit",8.31),("ao 8-bit",8.31),("ao FP8 E4M3",8.32),("lpmm 4-bit",7.72),("ao 4-bit",7.72),("lpmm 4-bit (*)",7.73)]:
    add(source=dict(repo="pytorch/ao", path="torchao/prototype/low_bit_optim/README.md", commit="03cf0adec63fdbae2fd6d2aa7688b52ee8c64004",
                    table="Benchmarks (ViT-H, BF16 AMP, 2 epochs)", row_label=label, column="max memory (GB)"),
        gpu="4070Ti SUPER", versions={"torch":None}, model="ViT-H (630M params) timm (exact checkpoint not printed in this version)", mode="full",
        precision="BF16 AMP", optimizer=f"Adam: {label}", batch=8, sharding="single GPU", metric="max_memory_allocated", metric_evidence=AO_EVID,
        value=v, oom=False, unit="GB", unit_note="GB = 1e9 bytes", gaps=["vision model", "older run than the torchao/optim README table; compile flag not stated", "torch version not stated"])

# ---------------------------------------------------------------- PEFT
add(source=dict(repo="huggingface/peft", path="docs/source/accelerate/fsdp.md", commit="018ca9d6f6dc9e77c7e458af816bd27681f7874d", table="Use PEFT and FSDP > Memory usage",
                row_label="'the memory consumed per GPU is  72-80 GB (90-98%) as seen in the screenshot below'", column=None),
    gpu="8x H100 80GB", versions={}, model="meta-llama/Llama-2-70b-hf", mode="lora", precision="bf16 mixed precision (accelerate mixed_precision: bf16)",
    optimizer="Trainer default (not stated)", batch=8, seq=2048, padding="packing True (max_seq_len 2048)", grad_ckpt=True, attention="flash_attention_2 (--use_flash_attn True)",
    lora=dict(rank=8, alpha=16, dropout=0.1, targets="all-linear"), sharding="FSDP FULL_SHARD, 8 processes, no CPU offload, use_orig_params false",
    metric="unknown", metric_evidence="'as seen in the screenshot below' (GPU memory usage screenshot)", value=None, value_range=[72,80], oom=False, unit="GB",
    gaps=["value given as a range 72-80", "counter not stated (screenshot)", "gradient_accumulation_steps 4", "library versions not stated"])
add(source=dict(repo="huggingface/peft", path="docs/source/accelerate/fsdp.md", commit="018ca9d6f6dc9e77c7e458af816bd27681f7874d", table="Use PEFT QLoRA and FSDP > Memory usage",
                row_label="'the memory consumed per GPU is **19.6 GB** while CPU RAM usage is around **107 GB**'", column=None),
    gpu="2 GPUs (section title says 2X24GB)", versions={"bitsandbytes":">=0.43.3","accelerate":">=1.0.1","transformers":">4.44.2","trl":">0.11.4","peft":">0.13.0"},
    model="meta-llama/Llama-2-70b-hf", mode="qlora", precision="bf16 compute, 4-bit base (bnb_4bit_quant_type not shown in the launch command), quant storage bf16",
    batch=2, seq=2048, padding="packing True", grad_ckpt=True, attention="flash_attention_2", lora=dict(rank=8, alpha=16, dropout=0.1, targets="all-linear"),
    quantization=dict(method="bitsandbytes 4-bit", double_quant=True, compute_dtype="bfloat16", quant_storage="bfloat16"),
    sharding="FSDP FULL_SHARD, 2 processes, fsdp_offload_params true (CPU offload)", metric="unknown", metric_evidence="text only", value=19.6, oom=False, unit="GB",
    gaps=["counter not stated", "bnb_4bit_quant_type not shown in the launch command", "GPU model not stated"])
add(source=dict(repo="huggingface/peft", path="docs/source/accelerate/fsdp.md", commit="018ca9d6f6dc9e77c7e458af816bd27681f7874d", table="Use PEFT QLoRA and FSDP > Memory usage",
                row_label="'When disabling CPU offloading, the GPU memory usage is  **35.6 GB/ GPU**'", column=None),
    gpu="2 GPUs (not stated; 35.6 GB exceeds the 24GB of the section title)", model="meta-llama/Llama-2-70b-hf", mode="qlora", precision="bf16 compute, 4-bit",
    batch=2, seq=2048, padding="packing True", grad_ckpt=True, attention="flash_attention_2", lora=dict(rank=8, alpha=16, dropout=0.1, targets="all-linear"),
    quantization=dict(method="bitsandbytes 4-bit", double_quant=True, compute_dtype="bfloat16", quant_storage="bfloat16"),
    sharding="FSDP FULL_SHARD, 2 processes, no CPU offload", metric="unknown", metric_evidence="text only", value=35.6, oom=False, unit="GB",
    gaps=["counter not stated", "GPU model not stated"])
add(source=dict(repo="huggingface/peft", path="docs/source/accelerate/deepspeed.md", commit="09802c1b43fff9b087be42e149d70e5350ff407a", table="Use PEFT and DeepSpeed with ZeRO3 ... > Memory usage",
                row_label="'the memory consumed per GPU is 64 GB (80%) as seen in the screenshot below'", column=None),
    gpu="8x H100 80GB", model="meta-llama/Llama-2-70b-hf", mode="lora", precision="bf16 mixed precision", batch=8, seq=2048, padding="packing True",
    grad_ckpt=True, attention="flash_attention_2", lora=dict(rank=8, alpha=16, dropout=0.1, targets="all-linear"),
    sharding="DeepSpeed ZeRO-3, 8 processes, no offload", metric="unknown", metric_evidence="'as seen in the screenshot below'", value=64, oom=False, unit="GB",
    gaps=["counter not stated (screenshot)", "gradient_accumulation_steps 4"])
add(source=dict(repo="huggingface/peft", path="docs/source/accelerate/deepspeed.md", commit="09802c1b43fff9b087be42e149d70e5350ff407a", table="Use PEFT QLoRA and DeepSpeed with ZeRO3 ... > Memory usage",
                row_label="'the memory consumed per GPU is **36.6 GB**'", column=None),
    gpu="2X40GB GPUs (section title)", versions={"bitsandbytes":">=0.43.3","accelerate":">=1.0.1","transformers":">4.44.2","trl":">0.11.4","peft":">0.13.0"},
    model="meta-llama/Llama-2-70b-hf", mode="qlora", precision="bf16 mixed precision, 4-bit base", batch=2, seq=2048, padding="packing True", grad_ckpt=True,
    attention="flash_attention_2", lora=dict(rank=8, alpha=16, dropout=0.1, targets="all-linear"),
    quantization=dict(method="bitsandbytes 4-bit", double_quant=True, compute_dtype="bfloat16", quant_storage="bfloat16"),
    sharding="DeepSpeed ZeRO-3, 2 processes, no offload", metric="unknown", metric_evidence="text only", value=36.6, oom=False, unit="GB", gaps=["counter not stated"])
TM_EVID = ("examples/conditional_generation/peft_lora_seq2seq_accelerate_ds_zero3_offload.py (@000f631b9a075df211afe026501c078af329b3ae): TorchTracemalloc "
           "`reset_peak_memory_stats()`; `self.begin = memory_allocated()`; on exit `self.peak = max_memory_allocated()`; `self.peaked = b2mb(self.peak - self.begin)`; "
           "printed 'GPU Total Peak Memory consumed during the train (max): {tracemalloc.peaked + b2mb(tracemalloc.begin)}' with `b2mb(x) = int(x / 2**20)`")
for phase, v, lbl in (("train", 9404, "GPU Total Peak Memory consumed during the train (max): 9404"), ("eval-generate", 2654, "GPU Total Peak Memory consumed during the eval (max): 2654")):
    add(source=dict(repo="huggingface/peft", path="docs/source/accelerate/deepspeed.md", commit="09802c1b43fff9b087be42e149d70e5350ff407a",
                    table="Use PEFT and DeepSpeed with ZeRO3 and CPU Offloading ... > Train (output logs)", row_label=lbl, column=None,
                    also_published_in=["huggingface/peft README.md @0032f32a82fcec45748606a1b9dcc52986cef168 (same log)"]),
        gpu="single GPU (model not stated)", versions={"deepspeed":"v0.8.0 required (README)"}, model="facebook/bart-large", architecture="BartForConditionalGeneration",
        mode=("lora" if phase=="train" else "inference-generate (eval of the LoRA model)"), precision="fp32 (accelerate mixed_precision: 'no')",
        optimizer="torch.optim.AdamW (offloaded to CPU by ZeRO-3)", batch=8, seq=None, padding="tokenizer.pad(padding='longest') per batch (ought/raft twitter_complaints)",
        grad_ckpt=False, attention=None, lora=dict(rank=8, alpha=32, dropout=0.1, targets="PEFT default for BART (not stated in script)"),
        sharding="DeepSpeed ZeRO-3, 1 process, offload_optimizer_device cpu, offload_param_device cpu", metric="max_memory_allocated", metric_evidence=TM_EVID,
        value=v, oom=False, unit="MB (as printed)", unit_note="actually MiB: b2mb = int(x / 2**20)", gaps=["GPU model not stated", "sequence lengths vary (padding longest)", "peak over a whole epoch (epoch 4 log shown)"])
peft_readme = [("bigscience/T0_3B (3B params)","Full Finetuning",47.14),("bigscience/T0_3B (3B params)","PEFT-LoRA PyTorch",14.4),("bigscience/T0_3B (3B params)","PEFT-LoRA DeepSpeed with CPU Offloading",9.8),
               ("bigscience/mt0-xxl (12B params)","Full Finetuning",None),("bigscience/mt0-xxl (12B params)","PEFT-LoRA PyTorch",56),("bigscience/mt0-xxl (12B params)","PEFT-LoRA DeepSpeed with CPU Offloading",22),
               ("bigscience/bloomz-7b1 (7B params)","Full Finetuning",None),("bigscience/bloomz-7b1 (7B params)","PEFT-LoRA PyTorch",32),("bigscience/bloomz-7b1 (7B params)","PEFT-LoRA DeepSpeed with CPU Offloading",18.1)]
for m, col, v in peft_readme:
    add(source=dict(repo="huggingface/peft", path="README.md", commit="0032f32a82fcec45748606a1b9dcc52986cef168",
                    table="Use Cases > Get comparable performance to full finetuning ... (ought/raft/twitter_complaints)", row_label=m, column=col,
                    also_published_in=["later README versions and docs/source/index (same table)"]),
        gpu="Single A100 80GB GPU with CPU RAM above 64GB", model=m.split(" ")[0], mode=("full" if col=="Full Finetuning" else "lora"),
        precision="not stated (example scripts run fp32)", optimizer="not stated", batch=None, seq=None,
        sharding=("DeepSpeed ZeRO-3 with CPU offload" if "DeepSpeed" in col else "single GPU"), lora=(dict(rank=8, alpha=32, dropout=0.1, note="README getting-started config; not tied to table") if col!="Full Finetuning" else None),
        metric="unknown", metric_evidence="table cells 'xxGB GPU / yyGB CPU'; the GPU/CPU pair format matches the TorchTracemalloc logs of the PEFT examples but the README does not say how it was measured",
        value=v, oom=(v is None), unit="GB", gaps=["counter not stated", "batch/seq/precision not stated", "GB vs GiB not stated"] + (["printed as 'OOM GPU'"] if v is None else []))
# MetaMathQA
MM_EVID = ("method_comparison/MetaMathQA/utils.py: `cuda_memory_final = torch.cuda.max_memory_reserved()` (accelerator variant: "
           "`accelerator_memory_final = torch_accelerator_module.max_memory_reserved()`) and logged `\"cuda_memory_max\": (cuda_memory_final - cuda_memory_init)` where "
           "init_cuda() does `torch.cuda.reset_peak_memory_stats()`; `cuda_memory_init = torch.cuda.max_memory_reserved()` (must be < 500MB) -> peak reserved over the whole run "
           "(training steps AND the periodic/test evaluation with model.generate at batch_size_eval)")
for line in open(os.path.join(RAW, "metamath.jsonl")):
    r = json.loads(line)
    mode = {"LORA":"lora", None:"full", "IA3":"ia3", "PROMPT_TUNING":"prompt_tuning"}[r["peft_type"]]
    lora = None
    if r["peft_type"] == "LORA":
        lora = dict(rank=r["peft"]["r"], alpha=r["peft"]["lora_alpha"], targets=r["peft"]["target_modules"], dropout=r["peft"]["lora_dropout"], use_dora=r["peft"]["use_dora"])
    add(source=dict(repo="huggingface/peft", path=r["file"], commit=r["commit"], table="train_info", row_label=f"experiment_name={r['experiment_name']} created_at={r['created_at']}",
                    column=r.get("field_name","cuda_memory_max")),
        gpu=r["gpu"], versions=r["versions"], model=r["model_id"], architecture="LlamaForCausalLM", mode=mode,
        precision="bfloat16 weights (dtype bfloat16, use_amp false; autocast_adapter_dtype true -> adapter weights fp32)",
        optimizer=f"{r['optimizer_type']} {json.dumps(r['optimizer_kwargs'])}, grad_norm_clip 1.0, cosine schedule",
        batch=r["batch_size"], seq=r["max_seq_length"], new_tokens=r["generation_kwargs"]["max_new_tokens"],
        padding="tokenizer.pad to longest in batch; samples bucketed by length (BucketIterator, sorted long->short within buckets); max_seq_length 768 is the cap",
        grad_ckpt=False, attention=r["attn_implementation"] or "transformers default (sdpa)", lora=lora, quantization=None, sharding="single GPU",
        metric="max_memory_reserved", metric_evidence=MM_EVID, value=r["cuda_memory_max"], oom=False, unit="bytes",
        unit_note="raw bytes; README/console print uses // 2**20 as 'MB' (MiB)",
        extra=dict(peft_type=r["peft_type"], peft_config=r["peft"], reserved_avg_bytes=r["cuda_memory_reserved_avg"], reserved_99th_bytes=r["cuda_memory_reserved_99th"],
                   num_trainable_params=r["num_trainable_params"], num_total_params=r["num_total_params"], batch_size_eval=r["batch_size_eval"],
                   generation_kwargs=r["generation_kwargs"], max_steps=r["max_steps"], note=r.get("note")),
        gaps=["peak includes evaluation generation (batch_size_eval=50, max_new_tokens=300, max_length=800), not only training steps",
              "value is max_memory_reserved minus the (small, <500MB) reserved memory right after init, not max_memory_allocated",
              "per-batch sequence length varies (padding to longest; cap 768)", "several stored versions of this results file exist (re-runs); value is from the cited commit"])

# ---------------------------------------------------------------- accelerate big model inference
acc = [("GPT-J-6B","float16",11.7,0,"0GB","no"),("GPT-J-6B","float32",21.9,1.5,"0GB","no"),("GPT-Neo-X-20B","float16",21.5,18,"0GB","no"),
       ("GPT-Neo-X-20B","float32",20.3,22.7,"24.4GB","yes"),("T0pp (11B)","float32",21.1,21.3,"0GB","no"),("OPT-30B","float16",20.7,22.3,"14.1GB","no"),
       ("OPT-30B","float32",20.2,21.2,"23.5GB","yes")]
hub = {"GPT-J-6B":"sgugger/sharded-gpt-j-6B (tokenizer EleutherAI/gpt-j-6B)", "GPT-Neo-X-20B":"EleutherAI/gpt-neox-20b", "T0pp (11B)":"bigscience/T0pp (revision 'sharded')", "OPT-30B":"facebook/opt-30b"}
for m, dt, g0, g1, cpu, disk in acc:
    for gi, v in ((0, g0), (1, g1)):
        add(source=dict(repo="huggingface/accelerate", path="benchmarks/big_model_inference/README.md", commit="1d57b830a07f07f655fc298f2096de09c2998083",
                        also_published_in=["benchmarks/README.md @a1a687ce860e095d9d3697d5ec517c55c2b839d1 (same table)"], table="Results",
                        row_label=f"| {m} | ... | {dt} | ... | CPU use {cpu} | Disk offload {disk} |", column=f"GPU {gi} use"),
            gpu="2x Titan RTX (24GB), 32GB CPU RAM", versions={}, model=hub[m], mode="inference-generate (model.generate with default generation config on 6 short prompts, batch 1)",
            precision=dt, batch=1, seq=None, new_tokens=None, sharding=f"device_map='auto' across 2 GPUs + CPU ({cpu} on CPU) + disk offload {disk}", device_index=gi,
            metric="unknown", metric_evidence=("benchmarks/big_model_inference.py + measures_util.py log for both the loading and generation phases: "
                "'GPU {i} allocated' = (memory_allocated(i) - start)/2**20 and 'GPU {i} peak' = (max_memory_allocated(i) - start)/2**20 MiB; README does not say which of these (or which phase) the 'GPU i use' column is; README note: 'peak GPU memory is exactly the size of the model put on a given GPU'"),
            value=v, oom=False, unit="GB", unit_note="script logs MiB; conversion to the README 'GB' not shown",
            gaps=["which counter/phase not stated", "transformers/accelerate/torch versions not stated", "new tokens = transformers default max_length at the time (not stated)"])

# ---------------------------------------------------------------- LLaMA-Factory wiki (quoted in unsloth README)
for meth, bits, tgs, gram in [("HF",16,2392,18),("HF+FA2",16,2954,17),("Unsloth+FA2",16,4007,16),("HF",4,2415,9),("Unsloth+FA2",4,3726,7)]:
    add(source=dict(repo="unslothai/unsloth (presumed; the index returns this README text by content id only)", path="README.md", commit=None, index_content_id="31401897114",
                    table="Llama-Factory 3rd party benchmarking (quotes https://github.com/hiyouga/LLaMA-Factory/wiki/Performance-Comparison)",
                    row_label=f"| {meth} | {bits} | {tgs} | {gram}GB |", column="GRAM", secondary=True),
        gpu="NVIDIA A100 * 1", model="LLaMA2-7B (hub id not given)", mode=("lora" if bits==16 else "qlora"), precision=f"{bits}-bit base",
        batch=4, seq=1024, grad_ckpt=None, attention=("flash_attention_2" if "FA2" in meth else "default"), lora=dict(rank=8),
        quantization=(dict(method="4-bit (QLoRA)") if bits==4 else None), sharding="single GPU", metric="unknown",
        metric_evidence="'TGS: tokens per GPU per second. Model: LLaMA2-7B. GPU: NVIDIA A100 * 1. Batch size: 4. Gradient accumulation: 2. LoRA rank: 8. Max length: 1024.'",
        value=gram, oom=False, unit="GB", gaps=["secondary source: the LLaMA-Factory wiki page itself is not in the searchable corpora", "counter not stated", "versions not stated", "A100 40/80GB not stated"])

if __name__ == "__main__":  # (vramlab: guarded so that build.py can read `rows` without a file)
    with open(os.path.join(HERE, "rows.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(len(rows))
