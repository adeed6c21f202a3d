"""bench/profile_breakdown.py on a synthetic HLO dump and kernel trace (no compilation, no GPU).

The HLO text and the kernel events copy the formats of a real H200 profile (L2P, cuDNN attention, XLA command
buffers): a frozen query pass ('PromptedViT/...'), the prompted forward pass ('jvp(PromptedViT)/...'), the
backward pass ('transpose(jvp(PromptedViT))/...') and an optax update, with cuBLAS (nvjet_*) and cuDNN attention
(sdpa) kernels for custom-calls, and kernels inside CUDA graphs whose 'hlo_op' is only the command buffer's name.
"""

import collections

import pytest

from bench import profile_breakdown as pb

QUERY, FORWARD, BACKWARD = "query forward (frozen)", "prompted forward + loss", "backward"
OPTIMIZER, OTHER = "optimizer", "other"

# Optimized HLO (`--xla_dump_hlo_as_text`, after optimizations), as the real dumps write it: frame tables, fused
# computations, then the scheduled ENTRY. <Q>, <F> and <B> stand for encoderblock_0's name stack in each pass.
# loop_convert_fusion.2 runs loop_convert_fusion.1's kernel (deduplicated_name); wrapped_convert.1 and .2 fuse
# identical computations without that metadata and run one kernel named after .2 ('wrapped_convert_2').
# pylint: disable=line-too-long
HLO_TEXT = """\
HloModule jit__fun, is_scheduled=true, entry_computation_layout={(f32[8,16]{1,0}, f32[16]{0}, f32[16,16]{1,0}, f32[16,16]{1,0})->(f32[16,16]{1,0}, bf16[8,20]{1,0})}

FileNames
1 "/work/main/models/vit.py"
2 "/work/main/models/attention.py"
3 "/venv/lib/python3.12/site-packages/optax/_src/update.py"
4 "/venv/lib/python3.12/site-packages/flax/linen/normalization.py"

FunctionNames
1 "__call__"
2 "apply_updates"

FileLocations
1 {file_name_id=1 function_name_id=1 line=120 end_line=120 column=8 end_column=30}
2 {file_name_id=2 function_name_id=1 line=75 end_line=75 column=4 end_column=40}
3 {file_name_id=3 function_name_id=2 line=43 end_line=43 column=10 end_column=60}
4 {file_name_id=4 function_name_id=1 line=500 end_line=500 column=6 end_column=20}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=1}
3 {file_location_id=3 parent_frame_id=1}
4 {file_location_id=4 parent_frame_id=1}

%fused_convert (param_0.1: f32[8,16], param_1.1: f32[16]) -> bf16[8,16] {
  %param_0.1 = f32[8,16]{1,0} parameter(0), metadata={scheduling_name="param_0.1"}
  %param_1.1 = f32[16]{0} parameter(1), metadata={scheduling_name="param_1.1"}
  %broadcast.1 = f32[8,16]{1,0} broadcast(%param_1.1), dimensions={1}, metadata={op_name="jit(_fun)/<Q>/LayerNorm_0/mul" scheduling_name="broadcast.1" stack_frame_id=4}
  %multiply.1 = f32[8,16]{1,0} multiply(%param_0.1, %broadcast.1), metadata={op_name="jit(_fun)/<Q>/LayerNorm_0/mul" scheduling_name="multiply.1" stack_frame_id=4}
  ROOT %convert.1 = bf16[8,16]{1,0} convert(%multiply.1), metadata={op_name="jit(_fun)/<Q>/LayerNorm_0/convert_element_type" scheduling_name="convert.1" stack_frame_id=4}
}

%fused_convert.1 (param_0.2: f32[8,16], param_1.2: f32[16]) -> bf16[8,16] {
  %param_0.2 = f32[8,16]{1,0} parameter(0), metadata={scheduling_name="param_0.2"}
  %param_1.2 = f32[16]{0} parameter(1), metadata={scheduling_name="param_1.2"}
  %broadcast.2 = f32[8,16]{1,0} broadcast(%param_1.2), dimensions={1}, metadata={op_name="jit(_fun)/<F>/LayerNorm_0/mul" scheduling_name="broadcast.2" stack_frame_id=4}
  %multiply.2 = f32[8,16]{1,0} multiply(%param_0.2, %broadcast.2), metadata={op_name="jit(_fun)/<F>/LayerNorm_0/mul" scheduling_name="multiply.2" stack_frame_id=4}
  ROOT %convert.2 = bf16[8,16]{1,0} convert(%multiply.2), metadata={op_name="jit(_fun)/<F>/LayerNorm_0/convert_element_type" scheduling_name="convert.2" stack_frame_id=4}
}

%fused_pad (param_0.3: bf16[8,16]) -> bf16[8,24] {
  %param_0.3 = bf16[8,16]{1,0} parameter(0), metadata={scheduling_name="param_0.3"}
  %constant.3 = bf16[] constant(0)
  ROOT %pad.3 = bf16[8,24]{1,0} pad(%param_0.3, %constant.3), padding=0_0x0_8, metadata={op_name="jit(_fun)/<Q>/MultiHeadDotProductAttention_1/jit(_pad)/pad" scheduling_name="pad.3" stack_frame_id=2}
}

%fused_slice (param_0.4: bf16[8,24]) -> bf16[8,16] {
  %param_0.4 = bf16[8,24]{1,0} parameter(0), metadata={scheduling_name="param_0.4"}
  ROOT %slice.4 = bf16[8,16]{1,0} slice(%param_0.4), slice={[0:8], [0:16]}, metadata={op_name="jit(_fun)/<Q>/MultiHeadDotProductAttention_1/slice" scheduling_name="slice.4" stack_frame_id=2}
}

%wrapped_convert_computation (param_0.5: f32[16,16]) -> bf16[16,16] {
  %param_0.5 = f32[16,16]{1,0} parameter(0), metadata={scheduling_name="param_0.5"}
  ROOT %convert.5 = bf16[16,16]{1,0} convert(%param_0.5), metadata={op_name="jit(_fun)/<Q>/MultiHeadDotProductAttention_1/out/convert_element_type" scheduling_name="convert.5" stack_frame_id=1}
}

%wrapped_convert_computation.1 (param_0.6: f32[16,16]) -> bf16[16,16] {
  %param_0.6 = f32[16,16]{1,0} parameter(0), metadata={scheduling_name="param_0.6"}
  ROOT %convert.6 = bf16[16,16]{1,0} convert(%param_0.6), metadata={op_name="jit(_fun)/<F>/MultiHeadDotProductAttention_1/out/convert_element_type" scheduling_name="convert.6" stack_frame_id=1}
}

%fused_multiply (param_0.7: bf16[8,32]) -> bf16[8,32] {
  %param_0.7 = bf16[8,32]{1,0} parameter(0), metadata={scheduling_name="param_0.7"}
  %erf.7 = bf16[8,32]{1,0} erf(%param_0.7), metadata={op_name="jit(_fun)/<F>/MlpBlock_3/erf" scheduling_name="erf.7" stack_frame_id=1}
  ROOT %multiply.7 = bf16[8,32]{1,0} multiply(%param_0.7, %erf.7), metadata={op_name="jit(_fun)/<F>/MlpBlock_3/mul" scheduling_name="multiply.7" stack_frame_id=1}
}

%fused_pad.1 (param_0.8: bf16[8,20]) -> bf16[8,32] {
  %param_0.8 = bf16[8,20]{1,0} parameter(0), metadata={scheduling_name="param_0.8"}
  %constant.8 = bf16[] constant(0)
  ROOT %pad.8 = bf16[8,32]{1,0} pad(%param_0.8, %constant.8), padding=0_0x0_12, metadata={op_name="jit(_fun)/<B>/MultiHeadDotProductAttention_1/pad" scheduling_name="pad.8" stack_frame_id=2}
}

%fused_slice.1 (param_0.9: bf16[8,32]) -> bf16[8,20] {
  %param_0.9 = bf16[8,32]{1,0} parameter(0), metadata={scheduling_name="param_0.9"}
  ROOT %slice.9 = bf16[8,20]{1,0} slice(%param_0.9), slice={[0:8], [0:20]}, metadata={op_name="jit(_fun)/<B>/MultiHeadDotProductAttention_1/jit(_pad)/pad" scheduling_name="slice.9" stack_frame_id=2}
}

%fused_add (param_0.10: f32[16,16], param_1.10: f32[16,16]) -> f32[16,16] {
  %param_0.10 = f32[16,16]{1,0} parameter(0), metadata={scheduling_name="param_0.10"}
  %param_1.10 = f32[16,16]{1,0} parameter(1), metadata={scheduling_name="param_1.10"}
  ROOT %add.10 = f32[16,16]{1,0} add(%param_0.10, %param_1.10), metadata={op_name="jit(_fun)/add" scheduling_name="add.10" stack_frame_id=3}
}

ENTRY %main.100 (p0: f32[8,16], p1: f32[16], p2: f32[16,16], p3: f32[16,16]) -> (f32[16,16], bf16[8,20]) {
  %p0 = f32[8,16]{1,0} parameter(0), metadata={scheduling_name="p0"}
  %p1 = f32[16]{0} parameter(1), metadata={scheduling_name="p1"}
  %p2 = f32[16,16]{1,0} parameter(2), metadata={scheduling_name="p2"}
  %p3 = f32[16,16]{1,0} parameter(3), metadata={scheduling_name="p3"}
  %loop_convert_fusion.1 = bf16[8,16]{1,0} fusion(%p0, %p1), kind=kLoop, calls=%fused_convert, metadata={op_name="jit(_fun)/<Q>/LayerNorm_0/convert_element_type" deduplicated_name="loop_convert_fusion.1" scheduling_name="loop_convert_fusion.1" stack_frame_id=4}, backend_config={"operation_queue_id":"0"}
  %custom-call.1 = (bf16[8,16]{1,0}, s8[4096]{0}) custom-call(%loop_convert_fusion.1, %p2), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(_fun)/<Q>/MultiHeadDotProductAttention_1/query/dot_general" scheduling_name="custom-call.1" stack_frame_id=1}, backend_config={"gemm_backend_config":{"alpha_real":1,"beta":0,"epilogue":"DEFAULT"},"operation_queue_id":"0"}
  %get-tuple-element.1 = bf16[8,16]{1,0} get-tuple-element(%custom-call.1), index=0, metadata={scheduling_name="get-tuple-element.1"}
  %loop_pad_fusion.1 = bf16[8,24]{1,0} fusion(%get-tuple-element.1), kind=kLoop, calls=%fused_pad, metadata={op_name="jit(_fun)/<Q>/MultiHeadDotProductAttention_1/jit(_pad)/pad" deduplicated_name="loop_pad_fusion.1" scheduling_name="loop_pad_fusion.1" stack_frame_id=2}, backend_config={"operation_queue_id":"0"}
  %dot_product_attention_fwd.1 = (bf16[8,24]{1,0}, u8[256]{0}) custom-call(%loop_pad_fusion.1, %loop_pad_fusion.1, %loop_pad_fusion.1), custom_call_target="__cudnn$fmhaSoftmax", api_version=API_VERSION_STATUS_RETURNING, metadata={op_name="jit(_fun)/<Q>/MultiHeadDotProductAttention_1/dot_product_attention_fwd" scheduling_name="dot_product_attention_fwd.1" stack_frame_id=2}, backend_config={"cudnn_fmha_backend_config":{"mask_type":"NO_MASK"},"operation_queue_id":"0"}
  %get-tuple-element.2 = bf16[8,24]{1,0} get-tuple-element(%dot_product_attention_fwd.1), index=0, metadata={scheduling_name="get-tuple-element.2"}
  %loop_slice_fusion.1 = bf16[8,16]{1,0} fusion(%get-tuple-element.2), kind=kLoop, calls=%fused_slice, metadata={op_name="jit(_fun)/<Q>/MultiHeadDotProductAttention_1/slice" deduplicated_name="loop_slice_fusion.1" scheduling_name="loop_slice_fusion.1" stack_frame_id=2}, backend_config={"operation_queue_id":"0"}
  %wrapped_convert.1 = bf16[16,16]{1,0} fusion(%p2), kind=kLoop, calls=%wrapped_convert_computation, metadata={op_name="jit(_fun)/<Q>/MultiHeadDotProductAttention_1/out/convert_element_type" scheduling_name="wrapped_convert.1" stack_frame_id=1}
  %loop_convert_fusion.2 = bf16[8,16]{1,0} fusion(%p0, %p1), kind=kLoop, calls=%fused_convert.1, metadata={op_name="jit(_fun)/<F>/LayerNorm_0/convert_element_type" deduplicated_name="loop_convert_fusion.1" scheduling_name="loop_convert_fusion.2" stack_frame_id=4}, backend_config={"operation_queue_id":"0"}
  %custom-call.2 = (bf16[8,32]{1,0}, s8[4096]{0}) custom-call(%loop_convert_fusion.2, %p2), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(_fun)/<F>/MlpBlock_3/Dense_0/dot_general" scheduling_name="custom-call.2" stack_frame_id=1}, backend_config={"gemm_backend_config":{"alpha_real":1,"beta":0,"epilogue":"DEFAULT"},"operation_queue_id":"0"}
  %wrapped_convert.2 = bf16[16,16]{1,0} fusion(%p3), kind=kLoop, calls=%wrapped_convert_computation.1, metadata={op_name="jit(_fun)/<F>/MultiHeadDotProductAttention_1/out/convert_element_type" scheduling_name="wrapped_convert.2" stack_frame_id=1}
  %get-tuple-element.3 = bf16[8,32]{1,0} get-tuple-element(%custom-call.2), index=0, metadata={scheduling_name="get-tuple-element.3"}
  %loop_multiply_fusion.1 = bf16[8,32]{1,0} fusion(%get-tuple-element.3), kind=kLoop, calls=%fused_multiply, metadata={op_name="jit(_fun)/<F>/MlpBlock_3/mul" deduplicated_name="loop_multiply_fusion.1" scheduling_name="loop_multiply_fusion.1" stack_frame_id=1}, backend_config={"operation_queue_id":"0"}
  %bitcast.1 = bf16[8,20]{1,0} bitcast(%loop_multiply_fusion.1), metadata={op_name="jit(_fun)/<B>/MultiHeadDotProductAttention_1/out/dot_general" scheduling_name="bitcast.1" stack_frame_id=2}
  %loop_pad_fusion.2 = bf16[8,32]{1,0} fusion(%bitcast.1), kind=kLoop, calls=%fused_pad.1, metadata={op_name="jit(_fun)/<B>/MultiHeadDotProductAttention_1/pad" deduplicated_name="loop_pad_fusion.2" scheduling_name="loop_pad_fusion.2" stack_frame_id=2}, backend_config={"operation_queue_id":"0"}
  %dot_product_attention_bwd.1 = (bf16[8,32]{1,0}, bf16[8,32]{1,0}, u8[1024]{0}) custom-call(%loop_pad_fusion.2, %get-tuple-element.2), custom_call_target="__cudnn$fmhaSoftmaxBackward", api_version=API_VERSION_STATUS_RETURNING, metadata={op_name="jit(_fun)/<B>/MultiHeadDotProductAttention_1/dot_product_attention_bwd" scheduling_name="dot_product_attention_bwd.1" stack_frame_id=2}, backend_config={"cudnn_fmha_backend_config":{"mask_type":"NO_MASK"},"operation_queue_id":"0"}
  %get-tuple-element.4 = bf16[8,32]{1,0} get-tuple-element(%dot_product_attention_bwd.1), index=0, metadata={scheduling_name="get-tuple-element.4"}
  %loop_slice_fusion.2 = bf16[8,20]{1,0} fusion(%get-tuple-element.4), kind=kLoop, calls=%fused_slice.1, metadata={op_name="jit(_fun)/<B>/MultiHeadDotProductAttention_1/jit(_pad)/pad" deduplicated_name="loop_slice_fusion.2" scheduling_name="loop_slice_fusion.2" stack_frame_id=2}, backend_config={"operation_queue_id":"0"}
  %custom-call.3 = (f32[16,16]{1,0}, s8[4096]{0}) custom-call(%loop_slice_fusion.2, %loop_convert_fusion.1), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(_fun)/<B>/MultiHeadDotProductAttention_1/query/dot_general" scheduling_name="custom-call.3" stack_frame_id=1}, backend_config={"gemm_backend_config":{"alpha_real":1,"beta":0,"epilogue":"DEFAULT"},"operation_queue_id":"0"}
  %get-tuple-element.5 = f32[16,16]{1,0} get-tuple-element(%custom-call.3), index=0, metadata={scheduling_name="get-tuple-element.5"}
  %loop_add_fusion.1 = f32[16,16]{1,0} fusion(%p3, %get-tuple-element.5), kind=kLoop, calls=%fused_add, metadata={op_name="jit(_fun)/add" deduplicated_name="loop_add_fusion.1" scheduling_name="loop_add_fusion.1" stack_frame_id=3}, backend_config={"operation_queue_id":"0"}
  ROOT %tuple.1 = (f32[16,16]{1,0}, bf16[8,20]{1,0}) tuple(%loop_add_fusion.1, %loop_slice_fusion.2), metadata={scheduling_name="tuple.1"}
}
""".replace("<Q>", "PromptedViT/Transformer/encoderblock_0").replace(
    "<F>", "jvp(PromptedViT)/Transformer/encoderblock_0").replace(
        "<B>", "transpose(jvp(PromptedViT))/Transformer/encoderblock_0")
# pylint: enable=line-too-long

# The ENTRY instructions that launch kernels, in schedule order.
KERNEL_SCHEDULE = ["loop_convert_fusion.1", "custom-call.1", "loop_pad_fusion.1", "dot_product_attention_fwd.1",
                   "loop_slice_fusion.1", "wrapped_convert.1", "loop_convert_fusion.2", "custom-call.2",
                   "wrapped_convert.2", "loop_multiply_fusion.1", "loop_pad_fusion.2", "dot_product_attention_bwd.1",
                   "loop_slice_fusion.2", "custom-call.3", "loop_add_fusion.1"]

NNT = "nvjet_sm90_tst_128x128_64x6_2x1_v_bz_NNT"
TNT = "nvjet_sm90_tst_128x128_64x6_2x1_v_bz_TNT"
FPROP = "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x1_kernel0_0"
BPROP = "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64_1x4x1_cga1x1x1_kernel0_0"
DOT_DO_O = ("void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*, void const*, void*, void*, "
            "unsigned int, float, bool, int)")
CONVERT_DQ = "void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*, unsigned int, float const*, bool)"
MEMSET = "Memset 3"
CB_A, CB_B = "command_buffer_2", "command_buffer_3"  # 'hlo_op' of the kernels of XLA's command buffers.

# One step of the trace, in time order: (kernel, its 'hlo_op' stat, microseconds, instruction it ran for,
# attribution method, category, phase). The last kernel belongs to another program (no instruction here).
STEP = [
    ("loop_convert_fusion_1", CB_A, 10, "loop_convert_fusion.1", "schedule", "layer norm", QUERY),
    (MEMSET, "custom-call.1", 2, "custom-call.1", "hlo_op", "memcpy/memset", QUERY),
    (NNT, "custom-call.1", 100, "custom-call.1", "hlo_op", "gemm: cuBLASLt", QUERY),
    ("loop_pad_fusion_1", CB_B, 30, "loop_pad_fusion.1", "schedule", "slice/pad/concat/gather", QUERY),
    (FPROP, CB_B, 90, "dot_product_attention_fwd.1", "schedule", "attention: cuDNN fwd", QUERY),
    ("loop_slice_fusion_1", CB_B, 20, "loop_slice_fusion.1", "schedule", "slice/pad/concat/gather", QUERY),
    ("wrapped_convert_2", CB_B, 3, "wrapped_convert.1", "schedule", "dtype convert", QUERY),
    ("loop_convert_fusion_1", CB_B, 12, "loop_convert_fusion.2", "schedule", "layer norm", FORWARD),
    (MEMSET, CB_B, 1, "custom-call.2", "neighbor", "memcpy/memset", FORWARD),
    (NNT, CB_B, 110, "custom-call.2", "schedule", "gemm: cuBLASLt", FORWARD),
    ("wrapped_convert_2", CB_B, 4, "wrapped_convert.2", "schedule", "dtype convert", FORWARD),
    ("loop_multiply_fusion_1", CB_B, 50, "loop_multiply_fusion.1", "schedule", "GELU (+ bias/residual)", FORWARD),
    ("loop_pad_fusion_2", CB_B, 32, "loop_pad_fusion.2", "schedule", "slice/pad/concat/gather", BACKWARD),
    (DOT_DO_O, CB_B, 40, "dot_product_attention_bwd.1", "order", "attention: cuDNN bwd", BACKWARD),
    (BPROP, CB_B, 250, "dot_product_attention_bwd.1", "schedule", "attention: cuDNN bwd", BACKWARD),
    (CONVERT_DQ, CB_B, 35, "dot_product_attention_bwd.1", "order", "attention: cuDNN bwd", BACKWARD),
    ("loop_slice_fusion_2", CB_B, 25, "loop_slice_fusion.2", "schedule", "slice/pad/concat/gather", BACKWARD),
    (TNT, CB_B, 120, "custom-call.3", "schedule", "gemm: cuBLASLt", BACKWARD),
    ("loop_add_fusion_1", "loop_add_fusion.1", 8, "loop_add_fusion.1", "hlo_op", "optimizer update", OPTIMIZER),
    ("loop_add_fusion_9", "command_buffer_1", 5, None, None, "other (no HLO op)", OTHER),
]
NUM_STEPS = 2
PLANE, STREAM = "/device:GPU:0", "Stream #14(Memset,Compute)"


def _events(step=STEP, num_steps=NUM_STEPS, skip=()):
  """Kernel events as `events_from_xplane` returns them: `num_steps` copies of `step`, 10 ms apart, 1 us between
  kernels; `skip`: (step, index) pairs left out. Stats as CUPTI/XLA give them: kernels of command buffers carry a
  CUDA graph id and node id (node ids of XLA kernels step like their schedule slots) and the command buffer as
  'hlo_op'; the last kernel of each step is another module's."""
  events = []
  for s in range(num_steps):
    t = s * 10e6
    for j, (kernel, hlo_op, us, instruction, _, _, _) in enumerate(step):
      stats = {"correlation_id": 10 * s + (1 if hlo_op == CB_A else 2), "tf_op": "XlaModule:",
               "hlo_op": hlo_op, "hlo_module": "jit_other" if instruction is None else "jit__fun",
               "program_id": 9288}
      if hlo_op.startswith("command_buffer"):
        slot = KERNEL_SCHEDULE.index(instruction) if instruction in KERNEL_SCHEDULE else 100 + j
        stats.update({"cuda_graph_id": 197, "cuda_graph_node_id": 846108557312 + slot})
      if (s, j) not in skip:
        events.append(pb.Event(PLANE, STREAM, kernel, t, us * 1e3, stats))
      t += us * 1e3 + 1e3
  return events


@pytest.fixture(scope="module")
def hlo():
  return pb.parse_hlo(HLO_TEXT)


@pytest.fixture(scope="module")
def result(hlo):
  return pb.breakdown(_events(), num_steps=NUM_STEPS, hlo=hlo, untraced_step_ms=1.0, traced_step_ms=1.1)


def _per_step(column: int, key=None) -> dict:
  """ms per step of STEP's kernels by `column` (5: category, 6: phase), computed from the table alone."""
  totals = collections.defaultdict(float)
  for row in STEP:
    totals[row[column] if key is None else key(row)] += row[2] / 1e3
  return dict(totals)


def test_parse_hlo_instructions(hlo):
  assert hlo.name == "jit__fun"
  no_kernel = pb._NO_KERNEL_OPS  # pylint: disable=protected-access
  assert [op.name for op in hlo.schedule if op.opcode not in no_kernel] == KERNEL_SCHEDULE
  assert all(op.entry for op in hlo.schedule) and not hlo["convert.1"].entry
  assert len(hlo.schedule) == 4 + len(KERNEL_SCHEDULE) + 7  # Parameters, kernels, 5 GTEs, a bitcast, the tuple.

  ln = hlo["loop_convert_fusion.1"]
  assert (ln.opcode, ln.fusion_kind, ln.calls, ln.dedup_name) == ("fusion", "kLoop", "fused_convert",
                                                                  "loop_convert_fusion.1")
  assert ln.ops == {"broadcast", "multiply", "convert"}  # The fused computation's opcodes, parameters left out.
  prefix = "jit(_fun)/PromptedViT/Transformer/encoderblock_0/LayerNorm_0/"
  assert ln.op_names == [prefix + "convert_element_type", prefix + "mul"]  # Its own first.
  assert ln.files == {"/venv/lib/python3.12/site-packages/flax/linen/normalization.py"}  # From the frame tables.
  assert hlo["loop_convert_fusion.2"].dedup_name == "loop_convert_fusion.1"
  assert hlo["wrapped_convert.1"].dedup_name == ""

  gemm = hlo["custom-call.1"]
  assert (gemm.opcode, gemm.target, gemm.fusion_kind, gemm.ops) == ("custom-call", "__cublas$lt$matmul", "",
                                                                    {"custom-call"})
  assert hlo["dot_product_attention_bwd.1"].target == "__cudnn$fmhaSoftmaxBackward"
  assert hlo["dot_product_attention_fwd.1"].op_name == (
      "jit(_fun)/PromptedViT/Transformer/encoderblock_0/MultiHeadDotProductAttention_1/dot_product_attention_fwd")
  assert hlo["loop_pad_fusion.1"].ops == {"pad", "constant"}
  assert hlo["loop_slice_fusion.2"].ops == {"slice"}
  assert hlo["loop_add_fusion.1"].files == {"/venv/lib/python3.12/site-packages/optax/_src/update.py"}
  assert hlo["get-tuple-element.1"].opcode == "get-tuple-element"


def test_source_file_metadata_overrides_frames():
  text = HLO_TEXT.replace('op_name="jit(_fun)/add" deduplicated_name="loop_add_fusion.1"',
                          'op_name="jit(_fun)/add" source_file="/work/main/libml/optim.py" '
                          'deduplicated_name="loop_add_fusion.1"')
  assert text != HLO_TEXT
  op = pb.parse_hlo(text)["loop_add_fusion.1"]
  # Its own source file; its fused add's (frame 3) still comes from the frame tables.
  assert op.files == {"/work/main/libml/optim.py", "/venv/lib/python3.12/site-packages/optax/_src/update.py"}


def test_kernel_groups(hlo):
  groups = pb.kernel_groups(hlo)
  # deduplicated_name joins loop_convert_fusion.2 to .1; identical fused computations join the wrapped converts.
  assert groups["loop_convert_fusion.2"] == groups["loop_convert_fusion.1"]
  assert groups["wrapped_convert.1"] == groups["wrapped_convert.2"]
  # Different shapes: separate kernels. Library calls launch no XLA kernel.
  assert groups["loop_pad_fusion.1"] != groups["loop_pad_fusion.2"]
  assert groups["loop_slice_fusion.1"] != groups["loop_slice_fusion.2"]
  assert "custom-call.1" not in groups and "dot_product_attention_fwd.1" not in groups
  assert len({groups[n] for n in KERNEL_SCHEDULE if n in groups}) == 8


def test_deduplicated_name_alone_joins_kernel_groups():
  # Fused computations that differ (here an add for a multiply) join only through their deduplicated_name.
  text = HLO_TEXT.replace("%multiply.2 = f32[8,16]{1,0} multiply(", "%multiply.2 = f32[8,16]{1,0} add(")
  assert text != HLO_TEXT
  hlo = pb.parse_hlo(text)
  assert hlo["loop_convert_fusion.1"].body != hlo["loop_convert_fusion.2"].body
  groups = pb.kernel_groups(hlo)
  assert groups["loop_convert_fusion.2"] == groups["loop_convert_fusion.1"]
  events = _events()
  ops, methods = pb.attribute_kernels(events, hlo)
  assert [(getattr(op, "name", None), how) for e, op, how in zip(events, ops, methods)
          if e.name == "loop_convert_fusion_1"] == [
      ("loop_convert_fusion.1", "schedule"), ("loop_convert_fusion.2", "schedule")] * NUM_STEPS


def test_every_kernel_matched_to_its_instruction(hlo):
  events = _events()
  ops, methods = pb.attribute_kernels(events, hlo)
  got = [(e.name, op.name if op is not None else None, how) for e, op, how in zip(events, ops, methods)]
  want = [(kernel, instruction, how) for kernel, _, _, instruction, how, _, _ in STEP] * NUM_STEPS
  assert got == want


def test_deduplicated_kernels_attributed_by_schedule_position(hlo):
  events = _events()
  ops, methods = pb.attribute_kernels(events, hlo)
  for kernel, expected in (("loop_convert_fusion_1", ["loop_convert_fusion.1", "loop_convert_fusion.2"]),
                           ("wrapped_convert_2", ["wrapped_convert.1", "wrapped_convert.2"])):
    matched = [(getattr(op, "name", None), how) for e, op, how in zip(events, ops, methods) if e.name == kernel]
    # One kernel name, two instructions of different phases: the first run of each step is the query pass's.
    assert matched == [(name, "schedule") for name in expected] * NUM_STEPS
    phases = [pb.phase_of(op, e.stats) for e, op in zip(events, ops) if e.name == kernel]
    assert phases == [QUERY, FORWARD] * NUM_STEPS


def test_alignment_survives_a_missing_kernel(hlo):
  # The trace starts after the first step's query-pass LayerNorm kernel: the one 'loop_convert_fusion_1' left in
  # that step is still the prompted forward pass's (by position, not by name), and the memset is its gemm's.
  events = _events(skip={(0, 0)})
  ops, methods = pb.attribute_kernels(events, hlo)
  first = [(e.name, op.name if op is not None else None, how) for e, op, how in zip(events, ops, methods)]
  want = [(k, i, h) for k, _, _, i, h, _, _ in STEP]
  assert first[:len(STEP) - 1] == want[1:]
  assert first[len(STEP) - 1:] == want


def test_no_hlo_leaves_kernels_unmatched():
  events = _events()
  ops, methods = pb.attribute_kernels(events, pb.HloModule())
  assert ops == [None] * len(events) and methods == [None] * len(events)


def test_breakdown_ms_per_step_by_category_and_phase(result):
  assert result["events"] == "GPU kernels (CUPTI)"
  assert result["num_steps"] == NUM_STEPS and result["kernels_per_step"] == len(STEP)
  total_ms = sum(row[2] for row in STEP) / 1e3
  assert total_ms == pytest.approx(0.947)
  assert result["kernel_ms_per_step"] == pytest.approx(total_ms)
  assert result["busy_ms_per_step"] == pytest.approx(total_ms)  # Kernels one after another: no overlap.

  categories = {c["category"]: c["ms_per_step"] for c in result["categories"]}
  assert categories == pytest.approx(_per_step(5))
  assert categories["gemm: cuBLASLt"] == pytest.approx(0.330)
  assert categories["attention: cuDNN bwd"] == pytest.approx(0.325)
  counts = {c["category"]: c["count_per_step"] for c in result["categories"]}
  assert counts["slice/pad/concat/gather"] == 4 and counts["memcpy/memset"] == 2

  phases = {p["phase"]: p["ms_per_step"] for p in result["phases"]}
  assert phases == pytest.approx(_per_step(6))
  assert phases == pytest.approx({QUERY: 0.255, FORWARD: 0.177, BACKWARD: 0.502, OPTIMIZER: 0.008, OTHER: 0.005})
  assert result["query_pass_share_of_kernel_time"] == pytest.approx(0.255 / total_ms)

  split = result["category_by_phase_ms_per_step"]
  assert split["gemm: cuBLASLt"] == pytest.approx({QUERY: 0.100, FORWARD: 0.110, BACKWARD: 0.120})
  assert split["layer norm"] == pytest.approx({QUERY: 0.010, FORWARD: 0.012})
  assert split["dtype convert"] == pytest.approx({QUERY: 0.003, FORWARD: 0.004})
  assert split["attention: cuDNN fwd"] == pytest.approx({QUERY: 0.090})
  assert result["matmul_kernel_ms_per_step"] == pytest.approx(0.330 + 0.090 + 0.325)
  assert result["non_matmul_kernel_ms_per_step"] == pytest.approx(total_ms - 0.745)


def test_breakdown_attention_pad_slice(result):
  pad_slice = result["attention_pad_slice_ms_per_step"]
  assert pad_slice == pytest.approx({
      "total": (30 + 20 + 32 + 25) / 1e3, "pad": 0.062, "slice": 0.045,
      f"pad_{QUERY}": 0.030, f"pad_{BACKWARD}": 0.032, f"slice_{QUERY}": 0.020, f"slice_{BACKWARD}": 0.025})
  groups = {g["group"]: g for g in result["elementwise"]["groups"]}
  assert groups["attention pad/slice"]["ms_per_step"] == pytest.approx(0.107)
  assert groups["attention pad/slice"]["count_per_step"] == 4
  assert {g: v["ms_per_step"] for g, v in groups.items()} == pytest.approx({
      "attention pad/slice": 0.107, "MLP bias + GELU": 0.050, "LayerNorm": 0.022, "optimizer": 0.008,
      "dtype convert": 0.007, "other (no HLO op)": 0.005, "memcpy/memset": 0.003})
  assert result["elementwise"]["ms_per_step"] == pytest.approx(0.947 - 0.745)


def test_breakdown_matched_fraction_and_methods(result):
  n = len(STEP)
  assert result["events_matched_to_hlo"] == pytest.approx((n - 1) / n)
  assert result["time_matched_to_hlo"] == pytest.approx(1 - 5 / 947)
  methods = collections.Counter(row[4] or "none" for row in STEP)
  assert methods == {"schedule": 13, "hlo_op": 3, "order": 2, "neighbor": 1, "none": 1}
  assert {h: v["kernels_pct"] for h, v in result["attribution"].items()} == pytest.approx(
      {h: 100.0 * k / n for h, k in methods.items()})
  # Graph node ids of consecutive XLA kernels of command_buffer_3 step like their schedule slots: 7 pairs a step.
  assert result["graph_node_check"] == {"agree": 14, "pairs": 14}
  assert result["command_buffers_ms_per_step"] == pytest.approx(
      {CB_B: _per_step(1)[CB_B], CB_A: 0.010, "command_buffer_1": 0.005})
  assert result["hlo_modules_ms_per_step"] == pytest.approx({"jit__fun": 0.942, "jit_other": 0.005})
  top = {k["kernel"]: k for k in result["top_kernels"]}
  assert top["loop_convert_fusion_1"]["hlo_ops"] == ["loop_convert_fusion.2", "loop_convert_fusion.1"]
  assert top["loop_convert_fusion_1"]["phases"] == {FORWARD: pytest.approx(54.5), QUERY: pytest.approx(45.5)}
  assert not any("name (shared)" in note for note in result["notes"])
  assert "Profile" in pb.format_breakdown(result, "synthetic")


def test_breakdown_without_hlo_uses_kernel_names():
  b = pb.breakdown(_events(), num_steps=NUM_STEPS)
  assert b["events_matched_to_hlo"] == 0.0
  categories = {c["category"]: c["ms_per_step"] for c in b["categories"]}
  assert categories["gemm: library kernel (no HLO op)"] == pytest.approx(0.330)
  assert categories["attention: cuDNN fwd"] == pytest.approx(0.090)
  assert categories["attention: cuDNN bwd"] == pytest.approx(0.325)  # The sdpa kernel and its cuDNN helpers.
  assert categories["memcpy/memset"] == pytest.approx(0.003)


@pytest.mark.parametrize("kernel,category", [
    (NNT, "gemm: library kernel (no HLO op)"),
    (FPROP, "attention: cuDNN fwd"),
    (BPROP, "attention: cuDNN bwd"),
    (MEMSET, "memcpy/memset"),
    ("memcpy32_post", "memcpy/memset"),
    ("gemm_fusion_dot_338", "gemm: Triton (no HLO op)"),
    ("loop_add_fusion_9", "other (no HLO op)"),
])
def test_category_of_kernel_names(kernel, category):
  assert pb.category_of(kernel, None) == category


def test_category_of_instructions(hlo):
  want = {"custom-call.1": "gemm: cuBLASLt", "dot_product_attention_fwd.1": "attention: cuDNN fwd",
          "dot_product_attention_bwd.1": "attention: cuDNN bwd", "loop_convert_fusion.2": "layer norm",
          "loop_pad_fusion.2": "slice/pad/concat/gather", "loop_slice_fusion.1": "slice/pad/concat/gather",
          "wrapped_convert.1": "dtype convert", "loop_multiply_fusion.1": "GELU (+ bias/residual)",
          "loop_add_fusion.1": "optimizer update"}
  assert {name: pb.category_of("kernel", hlo[name]) for name in want} == want
  # The cuDNN helper kernels take their custom-call's category; a memset stays a memset.
  assert pb.category_of(DOT_DO_O, hlo["dot_product_attention_bwd.1"]) == "attention: cuDNN bwd"
  assert pb.category_of(MEMSET, hlo["custom-call.2"]) == "memcpy/memset"
  cublas = pb.HloOp(opcode="custom-call", target="__cublas$gemm")
  assert pb.category_of("sm90_xmma_gemm_bf16", cublas) == "gemm: cuBLAS"


def test_phase_of_instructions(hlo):
  want = {"loop_convert_fusion.1": QUERY, "custom-call.1": QUERY, "dot_product_attention_fwd.1": QUERY,
          "loop_convert_fusion.2": FORWARD, "custom-call.2": FORWARD, "loop_multiply_fusion.1": FORWARD,
          "loop_pad_fusion.2": BACKWARD, "dot_product_attention_bwd.1": BACKWARD, "custom-call.3": BACKWARD,
          "loop_add_fusion.1": OPTIMIZER}
  assert {name: pb.phase_of(hlo[name], {}) for name in want} == want


def test_phase_of_name_stacks():
  op = lambda names, files=(): pb.HloOp(opcode="fusion", op_name=names[0], op_names=list(names), files=set(files))
  vit = "jit(_fun)/{}/Transformer/encoderblock_3/MlpBlock_3/mul"
  assert pb.phase_of(op([vit.format("PromptedViT")]), {}) == QUERY
  assert pb.phase_of(op([vit.format("jvp(PromptedViT)")]), {}) == FORWARD
  assert pb.phase_of(op([vit.format("transpose(jvp(PromptedViT))")]), {}) == BACKWARD
  # Its own name decides; else an optax source file; else the fused ops' names by majority.
  mixed = [vit.format("jvp(PromptedViT)"), vit.format("transpose(jvp(PromptedViT))")]
  assert pb.phase_of(op(mixed), {}) == FORWARD
  optax = "/venv/lib/python3.12/site-packages/optax/_src/update.py"
  flax = "/venv/lib/python3.12/site-packages/flax/linen/dtypes.py"
  assert pb.phase_of(op(["jit(_fun)/add"] + mixed[:1], files=[optax, flax]), {}) == OPTIMIZER
  assert pb.phase_of(op(["jit(_fun)/add", mixed[1], mixed[1], mixed[0]], files=[flax]), {}) == BACKWARD
  # optax's losses are not the optimizer.
  loss = op(["jit(_fun)/log_softmax"], files=["/venv/lib/python3.12/site-packages/optax/losses/_classification.py"])
  assert pb.phase_of(loss, {}) == OTHER
  # Without an instruction: the trace's own annotations.
  assert pb.phase_of(None, {"name": "jit(_fun)/transpose(jvp(PromptedViT))/head/dot_general"}) == BACKWARD
  assert pb.phase_of(None, {"tf_op": "XlaModule:"}) == OTHER
  assert pb.phase_of(None, {}) == "unattributed"


def test_kernel_library_class():
  assert pb.kernel_library_class(NNT) == ("main", "gemm")
  assert pb.kernel_library_class(FPROP) == ("main", "attn_fwd")
  assert pb.kernel_library_class(BPROP) == ("main", "attn_bwd")
  assert pb.kernel_library_class(DOT_DO_O) == ("aux", "attn_bwd")
  assert pb.kernel_library_class(CONVERT_DQ) == ("aux", "attn_bwd")
  assert pb.kernel_library_class(MEMSET) == ("glue", "other")
  assert pb.kernel_library_class("loop_pad_fusion_1") == (None, "other")  # An XLA kernel: named after its op.
