"""Large models: pretrained transformers from local files, real text, and the LLM compression
steps (weight-only RTN / GPTQ / AWQ, SmoothQuant W8A8, SparseGPT, Wanda).

Everything here needs the ``llm`` extra (``pip install 'lighten[llm]'``: transformers, gguf,
tokenizers, rdata); importing this package imports none of it. Nothing is ever downloaded:
models and tokenizers load with ``local_files_only=True`` from a folder, a GGUF file or an
installed package (:mod:`lighten.llm.sources`).

Calibration runs one decoder block at a time (:mod:`lighten.llm.blockwise`): the inputs of
block ``i`` are captured, its linears calibrated and replaced, and the compressed block is run
to give block ``i + 1`` its inputs; the model is never copied, and the peak memory is measured.

Sentence encoders (:mod:`lighten.llm.embedding`, :mod:`lighten.llm.encoder`): the ``embedding``
task (R8 linear probe, mean cosine to the original) and ``llm.encoder_prune`` (heads, FFN
neurons and layers of a BERT-family encoder, recovered by a layer-wise FFN reconstruction
and distillation from the original, optionally through fake int8: :mod:`lighten.llm.
encoder_recover`); the ``text-classification`` task (:mod:`lighten.llm.textclass`: the encoder
plus a linear head fine-tuned on R8 labels).
Decoders (:mod:`lighten.llm.decoder_prune`): ``llm.decoder_prune`` removes GQA-consistent
attention heads, FFN neurons and whole layers of a Llama-family LM, recovered by logit
distillation from the model before pruning.
"""
