"""The compiled path of the encoder and the decoder: which calls take it, the length buckets that bound how often it
compiles, the compiled layers, and what CUDA graphs need from training (gradient accumulation).

Eagerly, a CoLT5 layer is bound by kernel launches (routers, gathers, bias tables, two attentions: hundreds of small
kernels), so the uncompiled encoder is slower than LongT5's on a GPU; the decoder's layers, over a few hundred target
tokens, launch far more kernels than their arithmetic needs. Compiled, one graph per layer serves every layer of a
stack (the blocks share their code; Dynamo lifts the parameters to inputs), and under CUDA graphs the host launches
each layer's kernels in one call.

`CoLT5Config.encoder_compile` picks the path:
    "auto"        on CUDA, inputs of at least COMPILE_MIN_LENGTH tokens run their encoder blocks compiled (static
                  shapes): under CUDA graphs (torch.compile mode "reduce-overhead") without gradients, plainly
                  compiled with them (training keeps no graphs' memory pool); shorter inputs, other devices and
                  `output_attentions` run eagerly
    "cuda_graphs" CUDA graphs for training too, gradient accumulation included: the fastest; with gradient
                  checkpointing the blocks run compiled without graphs (a checkpoint replays the forward inside the
                  backward, which a recorded graph cannot)
    "off"         never compiles
A forward that runs the encoder compiled and decodes without a cache (training, an evaluation loss: the whole target
at once) runs the decoder blocks compiled too, by the same rules (read off the encoder's input; gradient checkpointing
in either stack keeps the decoder off CUDA graphs, whose step the encoder begins); incremental decoding (a cache) and
forwards given `encoder_outputs` (generate's) run them eagerly: generate's static-cache step is compiled by
Transformers.
A variant whose compilation fails (a compiler's bug) runs eagerly after a warning (`CompiledLayer`).
A compiled call pads its input to a length bucket (`length_bucket`; the mask hides the padding, and every router
counts a sample's real tokens, so the real tokens' outputs are those of the unpadded input) and compiles once per
bucket, batch size and mode (training or not, gradients or not); the decoder pads its target at the end to a coarser
target bucket (`target_bucket`; causal: the padding lies in every real position's future) and its copy of the
encoder's output to the input's bucket, and compiles once per pair of buckets, batch size and mode. Inductor's
on-disk caches make later processes compile faster.

The bound: Dynamo keeps RECOMPILE_LIMIT compiled variants of a layer's code (per stack: the encoder's and the
decoder's layers are different code) and runs further ones eagerly. Inputs of 2048-16384 tokens take 13 input
buckets and targets of 1-512 tokens 6 target buckets (16 to 512), so at one batch size the encoder's layer compiles
at most 13 x 2 = 26 variants (training with gradients, inference without) and the decoder's at most 13 x 6 x 2 = 156.
RECOMPILE_LIMIT = 256 leaves the decoder room for a second batch size in one mode (an evaluation batch size other
than the training one: 156 + 78 = 234) and the encoder for nine batch sizes in both modes. Length buckets for the
targets too (32 buckets for 1-512 tokens) would give 13 x 32 x 2 = 832 decoder variants.
"""

import contextlib
import math
import time

import torch
import torch.nn.functional as F
from transformers.utils import logging


logger = logging.get_logger(__name__)

ENCODER_COMPILE_MODES = ("auto", "cuda_graphs", "off")
COMPILE_MIN_LENGTH = 2048  # shorter inputs run eagerly: a compilation (seconds) outweighs what a short input saves
COMPILE_DEVICES = ("cuda",)
COMPILE_BACKEND = "inductor"
# Compiled variants of a layer's code that Dynamo keeps before it runs further ones eagerly (its default: 8; the
# module docstring counts the variants a run may meet). Each costs one compilation (seconds, about a minute for a Large
# model), paid only for the variants a run meets; past the limit the layer runs eagerly, launch-bound (above).
RECOMPILE_LIMIT = 256
TARGET_MIN_BUCKET = 16  # the smallest target bucket: every target of at most 16 tokens runs at 16


def length_bucket(length: int) -> int:
    """The padded length a compiled stack runs `length` tokens at: the smallest multiple of 2^(p - 2) that holds
    them, where 2^p <= length < 2^(p + 1), i.e. 4, 5, 6, 7 or 8 times 2^(p - 2). Four buckets an octave: at most 1/4
    more tokens than the input (just above a power of two), about 1/10 on average; 2048-16384 tokens take 13 buckets."""
    if length < 8:
        return length
    step = 2 ** (length.bit_length() - 3)
    return math.ceil(length / step) * step


def target_bucket(length: int) -> int:
    """The padded length the compiled decoder runs a target of `length` tokens at: the next power of two, at least
    TARGET_MIN_BUCKET. One bucket an octave, coarser than `length_bucket`'s four, because the decoder compiles once per
    pair (input bucket, target bucket): targets of 1-512 tokens take 6 buckets (16, 32, 64, 128, 256, 512) where
    `length_bucket` would give 32, which times 13 input buckets would pass RECOMPILE_LIMIT.

    What the padding costs: only the decoder's work grows, with its target tokens: at most twice a target's tokens
    above the floor (a target just above a power of two), a third more summed over lengths spread evenly in an octave,
    and at most 15 tokens below the floor. The compiled path runs only with inputs of at least COMPILE_MIN_LENGTH
    (2048) tokens, whose encoder the padding leaves as it is; a target of at most 512 tokens is at most a quarter of
    such an input's tokens.
    The floor spares the shortest targets four buckets of their own (1, 2, 4, 8) and keeps every bucket a multiple
    of 16."""
    return max(TARGET_MIN_BUCKET, 1 << (length - 1).bit_length())


def pad_to_bucket(tensor, value=0, bucket=length_bucket):
    """`tensor` (b, n, ...) padded at the end of its length (dim 1) to `bucket(n)` with `value`."""
    n = tensor.shape[1]
    return F.pad(tensor, (0, 0) * (tensor.ndim - 2) + (0, bucket(n) - n), value=value)


def encoder_compile_mode(config, hidden_states, output_attentions: bool, gradient_checkpointing: bool):
    """The torch.compile mode ("default" or "reduce-overhead") the encoder blocks run under for this call, or None to
    run them eagerly; `hidden_states` (b, n, d) are the encoder's (for the decoder's mode, its encoder_hidden_states).
    `config._attn_implementation` "eager" is the reference path (it returns attention weights) and stays eager; inside
    a caller's own torch.compile the blocks are traced into the caller's graph."""
    setting = config.encoder_compile
    if (
        setting == "off"
        or output_attentions
        or config._attn_implementation == "eager"
        or hidden_states.device.type not in COMPILE_DEVICES
        or hidden_states.shape[1] < COMPILE_MIN_LENGTH
        or torch.compiler.is_compiling()
    ):
        return None
    if not torch.is_grad_enabled() or (setting == "cuda_graphs" and not gradient_checkpointing):
        return "reduce-overhead"
    return "default"


_compiled_layers = {}
_compile_failures = 0  # failed variants so far (CompileReport reports none of them as compiled)


class CompiledLayer:
    """torch.compile of `layer` (CoLT5EncoderBlock.layer or CoLT5DecoderBlock.layer, called with the block as its first
    argument) with static shapes. A variant (its tensors' shapes and dtypes, gradients, training, autocast) whose
    compilation fails runs eagerly, the same function, after one warning that names the error; it is not tried again.
    With gradients the backward compiles with the forward (`backward_compiles_with_forward`), so its failures are
    caught here too."""

    def __init__(self, layer, mode: str):
        options = {"mode": mode} if COMPILE_BACKEND == "inductor" else {}
        self.layer = layer
        self.compiled = torch.compile(layer, backend=COMPILE_BACKEND, dynamic=False, **options)
        self.failed = set()

    def __call__(self, block, *args):
        if self.failed and self.variant(block, args) in self.failed:
            return self.layer(block, *args)
        try:
            return self.compiled(block, *args)
        # Inductor's or Triton's rejection of a generated kernel (InductorError is one), raised before the compiled
        # code has run
        except torch._dynamo.exc.BackendCompilerFailed as error:
            global _compile_failures
            _compile_failures += 1
            self.failed.add(self.variant(block, args))
            logger.warning(
                f"CoLT5: compiling the {type(block).__name__} layer for inputs of shape {tuple(args[0].shape)} failed "
                f"({compile_error(error)}); this shape runs eagerly (slower, same results). encoder_compile='off' "
                "skips compiling."
            )
        return self.layer(block, *args)

    @staticmethod
    def variant(block, args):
        """What a compilation is specific to (computed only once one has failed: the calls are the hot path)."""
        return (tuple(None if arg is None else (tuple(arg.shape), arg.dtype) for arg in args),
                torch.is_grad_enabled(), block.training, torch.is_autocast_enabled(args[0].device.type))


def backward_compiles_with_forward(started):
    """The context of a stack's blocks on a call `CompileReport.start` found new (`started`, None otherwise): with
    gradients, the layers' backward compiles with their forward instead of lazily at the first backward, so a failed
    compilation of the backward reaches `CompiledLayer` (whose variant then runs eagerly) instead of failing the
    backward, and the reported compile time is the whole step's."""
    if started is None or not torch.is_grad_enabled():
        return contextlib.nullcontext()
    return torch._functorch.config.patch(force_non_lazy_backward_lowering=True)


def compile_error(error) -> str:
    """One line for a failed compilation: the compiler's own exception and the last line of its message (a compile
    worker's message ends with the traceback of the error it met)."""
    inner = getattr(error, "inner_exception", None) or error
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    return f"{type(inner).__name__}: {lines[-1][:200] if lines else ''}".rstrip(": ")


def compiled_layer(layer, mode: str) -> CompiledLayer:
    """The `CompiledLayer` of `layer`, one per layer, mode and backend."""
    key = (layer, mode, COMPILE_BACKEND)
    if key not in _compiled_layers:
        # the accumulated limit caps all the variants of one code object whatever their guards: it must be as high
        names = ("recompile_limit", "accumulated_recompile_limit")
        if not hasattr(torch._dynamo.config, names[0]):  # older torch names them so
            names = ("cache_size_limit", "accumulated_cache_size_limit")
        for name in names:
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), RECOMPILE_LIMIT))
        _compiled_layers[key] = CompiledLayer(layer, mode)
    return _compiled_layers[key]


def before_compiled_blocks(mode: str, blocks, begins_step: bool):
    """What a stack does before its blocks run compiled under `mode`. Under CUDA graphs, `begins_step` marks a new step
    (the graphs' earlier outputs are spent); a stack running inside a step that another began (the decoder after the
    encoder, whose graphs' saved tensors its backward still needs) leaves it. With gradients, the blocks' parameters
    get `own_gradients`."""
    if mode != "reduce-overhead":
        return
    if begins_step:
        torch.compiler.cudagraph_mark_step_begin()
    if torch.is_grad_enabled():
        own_gradients(blocks)


class CompileReport:
    """Logs how long the first call of each compiled variant of a stack ("encoder" or "decoder") took (its
    compilation), once per variant."""

    def __init__(self, stack: str):
        self.stack = stack
        self.seen = set()

    @contextlib.contextmanager
    def blocks(self, mode, hidden_states, training, encoder_hidden_states=None):
        """The context of a stack's blocks running under `mode` (None: eagerly) on their padded `hidden_states` (and,
        for the decoder, padded `encoder_hidden_states`): on a variant's first call, with gradients, the backward
        compiles with the forward (`backward_compiles_with_forward`), and the time the blocks took is logged after
        them."""
        started = None if mode is None else self._start(mode, hidden_states, training, encoder_hidden_states)
        del hidden_states, encoder_hidden_states  # the blocks' outputs replace their inputs: this frame keeps neither
        with backward_compiles_with_forward(started):
            yield
        self._finish(started)

    def _start(self, mode, hidden_states, training, encoder_hidden_states=None):
        """The variant, the time and the failures so far to hand to `_finish`, or None for a variant seen before."""
        encoder_length = None if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        # what a layer's compiled variant is specific to (`CompiledLayer.variant`), as the stack's input shows it
        variant = (mode, tuple(hidden_states.shape[:2]), encoder_length, training, torch.is_grad_enabled(),
                   hidden_states.dtype, torch.is_autocast_enabled(hidden_states.device.type))
        if variant in self.seen:
            return None
        self.seen.add(variant)
        if hidden_states.is_cuda:
            torch.cuda.synchronize()
        return variant, time.perf_counter(), _compile_failures, hidden_states.is_cuda

    def _finish(self, started):
        if started is None:
            return
        (mode, (batch, length), encoder_length, training, gradients, *_), start, failures, cuda = started
        if cuda:
            torch.cuda.synchronize()
        if _compile_failures != failures:  # CompiledLayer said so
            return
        shape, buckets = f"{length}-token inputs", "Each length bucket compiles"
        if encoder_length is not None:
            shape, buckets = f"{length}-token targets of {encoder_length}-token inputs", "Each pair of buckets compiles"
        logger.warning(
            f"CoLT5 {self.stack}: compiled its layer for {shape} (batch {batch}, "
            f"{'training' if training else 'inference'}{'' if gradients else ', no gradients'}, mode {mode}) in "
            f"{time.perf_counter() - start:.1f} s{' (forward and backward)' if gradients else ''}"
            f". {buckets} once; encoder_compile='off' runs eagerly instead."
        )


def own_gradients(module):
    """Under CUDA graphs, a parameter's gradient is written into the graph's memory, which the next replay
    overwrites. Autograd keeps the first gradient of a parameter without a `.grad` as its `.grad` (no copy) and adds
    later ones into it, so a second micro-step of gradient accumulation would read and write overwritten memory. A hook
    copies each parameter's gradient out of the graph when it has no `.grad` yet (once per optimizer step; later
    micro-steps add into the copy). Installed once per parameter, also on parameters added later (adapters)."""
    for parameter in module.parameters():
        if parameter.requires_grad and not getattr(parameter, "_colt5_owns_gradient", False):
            parameter.register_hook(
                lambda gradient, parameter=parameter: gradient.clone() if parameter.grad is None else gradient
            )
            parameter._colt5_owns_gradient = True
