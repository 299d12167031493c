"""GGUF, the file format of llama.cpp, Ollama and LM Studio, both ways.

    format.py     the checked reader of the header and metadata, the format's errors
    reader.py     a GGUF file -> an MLX model (llama, qwen2, qwen3, gemma3), tensors dequantized exactly
    tokenizer.py  the tokenizer rebuilt from GGUF metadata, and embedded into a GGUF file
    blocks.py     the block types an MLX quantized layer maps to exactly (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), both ways
    writer.py     an MLX model -> GGUF (exact blocks repacked, or float types)
    ollama.py     the Ollama Modelfile beside an exported GGUF (chat TEMPLATE in Go, checked; stop tokens)
    llamacpp.py   llama.cpp itself, in process: tokenize, complete, score (optional: xllamacpp)
"""
