"""Trace readers: the shipped traces read with the counts and first rows checked by hand
against the files, fixtures in the exact formats of the unshipped releases (Azure 2024,
both BurstGPT layouts), trace specs, and errors that name file, line and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.records import Trace
from benchmarks.traces import (
    DEFAULT_DATA_DIR,
    TraceError,
    load_trace,
    read_azure,
    read_burstgpt,
    read_mooncake,
    read_sharegpt_lengths,
)

needs_data = pytest.mark.skipif(not DEFAULT_DATA_DIR.is_dir(),
                                reason=f"shared data not found at {DEFAULT_DATA_DIR}")


def lengths(trace: Trace, n: int = 3) -> list[tuple[float, int, int]]:
    return [(round(r.arrival_s, 7), r.prompt_tokens, r.output_tokens)
            for r in trace.requests[:n]]


def assert_ordered_from_zero(trace: Trace) -> None:
    arrivals = [r.arrival_s for r in trace.requests]
    assert arrivals[0] == 0.0
    assert arrivals == sorted(arrivals)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- shipped traces -------------------------------------------------------------------

@needs_data
@pytest.mark.parametrize(("spec", "count", "first_rows", "last_arrival_s"), [
    ("azure2023-code", 8819,
     [(0.0, 4808, 10), (0.052, 3180, 8), (0.098189, 110, 27)], 3435.948056),
    ("azure2023-conv", 19366,
     [(0.0, 374, 44), (4.314579, 396, 109), (4.541877, 879, 55)], 3501.721937),
])
def test_azure_2023_shipped(spec: str, count: int, first_rows: list[tuple[float, int, int]],
                            last_arrival_s: float) -> None:
    trace = load_trace(spec, data_dir=DEFAULT_DATA_DIR)
    assert trace.name == spec and trace.timed
    assert len(trace.requests) == count
    assert lengths(trace) == first_rows
    assert trace.requests[-1].arrival_s == pytest.approx(last_arrival_s, abs=1e-6)
    assert_ordered_from_zero(trace)


@needs_data
def test_mooncake_shipped() -> None:
    trace = load_trace("mooncake", data_dir=DEFAULT_DATA_DIR)
    assert len(trace.requests) == 12031 and trace.timed
    first = trace.requests[0]
    assert (first.prompt_tokens, first.output_tokens) == (6758, 500)
    assert first.prefix_block_ids == tuple(range(14)) and first.block_tokens == 512
    # The second request shares only block 0 with the first.
    assert trace.requests[1].prefix_block_ids[:2] == (0, 14)
    assert trace.requests[-1].arrival_s == pytest.approx(3536.999)  # 3536999 ms
    assert_ordered_from_zero(trace)


@needs_data
def test_sharegpt_lengths_shipped_are_untimed() -> None:
    trace = load_trace("ShareGPT", data_dir=DEFAULT_DATA_DIR)
    assert len(trace.requests) == 30731
    assert not trace.timed
    assert lengths(trace) == [(0.0, 74, 918), (0.0, 290, 905), (0.0, 1402, 711)]
    assert {r.arrival_s for r in trace.requests} == {0.0}


# --- fixtures in the formats of releases that are not shipped ------------------------

AZURE_2024 = """TIMESTAMP,ContextTokens,GeneratedTokens
2024-05-10 00:00:00.009930+00:00,4192,12
2024-05-10 00:00:00.012348+00:00,2211,340
2024-05-10 00:00:01.500000+00:00,87,5
2024-05-10 00:00:00.500000+00:00,1200,64
"""


def test_azure_2024_layout(tmp_path: Path) -> None:
    trace = read_azure(write(tmp_path, "AzureLLMInferenceTrace_conv_1week.csv", AZURE_2024))
    assert trace.name == "AzureLLMInferenceTrace_conv_1week"
    # Sorted by arrival (the out-of-order last row moves up), shifted to start at 0.
    assert lengths(trace, 4) == [(0.0, 4192, 12), (0.002418, 2211, 340),
                                 (0.49007, 1200, 64), (1.49007, 87, 5)]


def test_azure_timestamps_honour_the_utc_offset(tmp_path: Path) -> None:
    path = write(tmp_path, "zones.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                 "2024-05-10 00:00:00.000000+00:00,10,1\n"
                 "2024-05-10 03:00:02.250000+03:00,10,1\n")
    assert [r.arrival_s for r in read_azure(path).requests] == [0.0, 2.25]


BURSTGPT_ORIGINAL = """Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type
5,ChatGPT,472,18,490,Conversation log
45,ChatGPT,1087,230,1317,Conversation log
46,GPT-4,300,0,300,API log
118,GPT-4,417,276,693,Conversation log
130,ChatGPT,55,0,55,API log
"""

BURSTGPT_SESSIONS = """Timestamp,Session ID,Elapsed time,Model,Request tokens,\
Response tokens,Total tokens,Log Type
19440110,,2.5,ChatGPT,120,40,160,API log
19440112,4fa1c2,1.0,GPT-4,900,0,900,Conversation log
19440115,4fa1c2,3.2,GPT-4,950,210,1160,Conversation log
19440115.5,,0.8,ChatGPT,33,7,40,API log
"""


def test_burstgpt_original_layout_skips_and_counts_failures(tmp_path: Path) -> None:
    trace = read_burstgpt(write(tmp_path, "BurstGPT_1.csv", BURSTGPT_ORIGINAL))
    assert lengths(trace, 5) == [(0.0, 472, 18), (40.0, 1087, 230), (113.0, 417, 276)]
    assert "skipped 2 failed requests" in trace.source


def test_burstgpt_session_layout(tmp_path: Path) -> None:
    trace = read_burstgpt(write(tmp_path, "BurstGPT_3.csv", BURSTGPT_SESSIONS))
    assert lengths(trace, 5) == [(0.0, 120, 40), (5.0, 950, 210), (5.5, 33, 7)]
    assert "skipped 1 failed requests" in trace.source


def test_burstgpt_spec_format_is_case_insensitive(tmp_path: Path) -> None:
    path = write(tmp_path, "b.csv", BURSTGPT_ORIGINAL)
    trace = load_trace(f"BurstGPT:{path}", data_dir=tmp_path)
    assert trace.name == "b" and len(trace.requests) == 3


def test_a_trace_of_only_failures_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "f.csv", "Timestamp,Model,Request tokens,Response tokens\n"
                 "1,ChatGPT,10,0\n")
    with pytest.raises(TraceError, match="no successful requests"):
        read_burstgpt(path)


# --- specs ---------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["sharegpt-8k", "azure:", "parquet:/x.parquet", ""])
def test_unknown_spec_lists_names_and_formats(spec: str) -> None:
    with pytest.raises(ValueError, match="unknown trace spec") as info:
        load_trace(spec, data_dir=Path("/nonexistent"))
    assert not isinstance(info.value, TraceError)
    for known in ("azure2023-code", "mooncake", "lphd", "mixed", "burstgpt",
                  "sharegpt-lengths"):
        assert known in str(info.value)


def test_spec_paths_of_every_format(tmp_path: Path) -> None:
    azure = write(tmp_path, "a.csv", AZURE_2024)
    moon = write(tmp_path, "m.jsonl",
                 '{"timestamp": 1000, "input_length": 600, "output_length": 3, '
                 '"hash_ids": [7, 8]}\n\n')
    share = write(tmp_path, "s.csv", "num_prefill_tokens,num_decode_tokens\n5,6\n")
    assert len(load_trace(f"azure:{azure}", data_dir=tmp_path).requests) == 4
    assert load_trace(f"Mooncake:{moon}", data_dir=tmp_path).requests[0].prefix_block_ids \
        == (7, 8)
    assert not load_trace(f"sharegpt-lengths:{share}", data_dir=tmp_path).timed


def test_missing_shipped_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="AzureLLMInferenceTrace_code.csv: cannot read"):
        load_trace("azure2023-code", data_dir=tmp_path)


# --- bad input -----------------------------------------------------------------------

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
AZURE_ROW = "2023-11-16 18:17:03.9799600,4808,10\n"

BAD_INPUT = {
    "missing column": (read_azure, "TIMESTAMP,ContextTokens\n2023-11-16 18:17:03.97,4\n",
                       1, "missing column 'GeneratedTokens'"),
    "non-numeric on line 3": (read_azure, AZURE_HEADER + AZURE_ROW
                              + "2023-11-16 18:17:04.0319600,lots,8\n",
                              3, "ContextTokens is not a whole number: 'lots'"),
    "empty csv": (read_sharegpt_lengths, "", 1, "empty file"),
    "empty jsonl": (read_mooncake, "\n", 1, "empty file"),
    "bad azure timestamp": (read_azure, AZURE_HEADER + AZURE_ROW
                            + "2023-13-16 18:17:04.03,1,1\n", 3, "bad timestamp"),
    "azure timestamp in seconds": (read_azure, AZURE_HEADER + "1700000000,1,1\n",
                                   2, "bad timestamp"),
    "bad burstgpt timestamp": (read_burstgpt, "Timestamp,Request tokens,Response tokens\n"
                               "soon,1,1\n", 2, "bad timestamp in Timestamp: 'soon'"),
    "bad mooncake timestamp": (read_mooncake, '{"timestamp": "noon", "input_length": 1, '
                               '"output_length": 1, "hash_ids": []}\n', 1, "bad timestamp"),
    "negative length": (read_sharegpt_lengths, "num_prefill_tokens,num_decode_tokens\n"
                        "5,6\n5,-6\n", 3, "num_decode_tokens is negative"),
    "zero-length prompt": (read_azure, AZURE_HEADER + "2023-11-16 18:17:03.97,0,10\n",
                           2, "ContextTokens must be at least 1"),
    "fractional length": (read_sharegpt_lengths, "num_prefill_tokens,num_decode_tokens\n"
                          "5.5,6\n", 2, "not a whole number: '5.5'"),
    "short row": (read_azure, AZURE_HEADER + AZURE_ROW + "2023-11-16 18:17:04.03,8\n",
                  3, "2 fields, the header has 3"),
    "mooncake not json": (read_mooncake, '{"timestamp": 0, "input_length": 1, '
                          '"output_length": 1, "hash_ids": []}\n{oops\n', 2, "not JSON"),
    "mooncake missing field": (read_mooncake, '{"timestamp": 0, "input_length": 1, '
                               '"hash_ids": []}\n', 1, "missing field 'output_length'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_names_file_line_and_reason(tmp_path: Path, case: str) -> None:
    reader, text, line, reason = BAD_INPUT[case]
    path = write(tmp_path, "trace.txt", text)
    with pytest.raises(ValueError) as info:  # callers may catch TraceError as ValueError
        reader(path)
    assert isinstance(info.value, TraceError)
    assert str(info.value).startswith(f"{path}:{line}: ")
    assert reason in str(info.value)
    assert info.value.line == line


def test_header_only_file_has_no_requests(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no requests"):
        read_azure(write(tmp_path, "h.csv", AZURE_HEADER))
