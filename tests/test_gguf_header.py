import numpy as np
import pytest
from gguf import GGUFWriter, LlamaFileType

from slp_runner.errors import NotGGUF
from slp_runner.gguf_header import read_gguf_metadata


@pytest.fixture
def tiny_gguf(tmp_path):
    """A real GGUF written by the gguf package itself, with known facts."""
    path = tmp_path / "tiny.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny test")
    w.add_context_length(4096)
    w.add_embedding_length(8)
    w.add_block_count(2)
    w.add_file_type(LlamaFileType.MOSTLY_Q8_0)
    w.add_token_list([f"tok{i}" for i in range(1000)])
    w.add_token_scores([0.5] * 1000)
    w.add_tensor("embd", np.zeros((1000, 8), dtype=np.float32))
    w.add_tensor("out", np.zeros((3, 5, 7), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_reads_known_facts(tiny_gguf):
    meta = read_gguf_metadata(str(tiny_gguf))
    assert meta["architecture"] == "llama"
    assert meta["name"] == "tiny test"
    assert meta["context_length"] == 4096
    assert meta["block_count"] == 2
    assert meta["file_type"] == "MOSTLY_Q8_0"
    assert meta["quantization"] == "Q8_0"
    assert meta["parameter_count"] == 1000 * 8 + 3 * 5 * 7
    assert meta["vocab_size"] == 1000
    assert meta["tensor_count"] == 2


def test_real_gemma_header(gemma_path):
    meta = read_gguf_metadata(gemma_path)
    assert meta["architecture"] == "gemma3"
    assert meta["quantization"] == "Q4_K_M"
    assert meta["context_length"] == 32768
    assert meta["vocab_size"] == 262144
    assert 250_000_000 < meta["parameter_count"] < 290_000_000  # "270M"


def test_not_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"PK\x03\x04 not a model at all")
    with pytest.raises(NotGGUF, match=r"model\.gguf: not a GGUF file"):
        read_gguf_metadata(str(p))


def test_truncated_header(tiny_gguf, tmp_path):
    p = tmp_path / "cut.gguf"
    p.write_bytes(tiny_gguf.read_bytes()[:100])
    with pytest.raises(NotGGUF, match=r"cut\.gguf: (truncated|corrupt)"):
        read_gguf_metadata(str(p))
