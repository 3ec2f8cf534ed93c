"""The papers' architectures, each deterministic, Bayesian (Adv-BNN layers) or with RSE noise layers.

>>> model = fastdiv.nn.build_model("graddiv-mnist", in_shape=(1, 28, 28), kind="bayes", sigma0=0.05)
>>> grads, logits = fastdiv.sample_input_grads(model, x, y, 10)

Every model is a :class:`Classifier`: ``head(body(input_check(x)))`` with ``input_check`` rejecting a
wrong input shape at the front, ``body`` everything up to the features of the last linear layer
(``[N, head.in_features]``; where ensemble dropout such as LPD goes) and ``head`` the last linear
layer, returning logits ``[N, num_classes]``.

Architectures (paper input shape; activations as the paper says, else ReLU):

========================  =============  ===========================================================
name                      paper shape    layers
========================  =============  ===========================================================
``graddiv-mnist``         (1, 28, 28)    GradDiv MNIST: C(32,3,1,1)-LReLU-C(64,3,1,1)-LReLU-MP-
                                         C(128,3,1,1)-LReLU-MP-F(1024)-LReLU-F(C)
``graddiv-stl10``         (3, 96, 96)    GradDiv STL-10: [C(c,3,1,1)-BN-ReLU-MP] for c = 32, 64, 128, 256,
                                         C(256,3,1)-BN-ReLU-C(512,3,1)-BN-ReLU-AP-F(C)
``vgg16``                 (3, 32, 32)    VGG-16 with BN as in Adv-BNN / RSE code: 13 C(c,3,1,1)-BN-ReLU
                                         with 5 MP, global average pool, F(C)
``conv3``                 (1, 28, 28)    GAL Conv-3: C32-C64-M-C128-M-FC1024-FC(C), 3x3 convs (padding 1),
                                         LeakyReLU (the same layers as ``graddiv-mnist``)
``conv4``                 (3, 32, 32)    GAL Conv-4: C32-C64-C128-M-C128-M-FC1024-FC(C), LeakyReLU
``resnet20``/``resnet26`` (3, 32, 32)    CIFAR ResNet 6n+2 (n = 3 / 4): C16, n x {RES16}, n x {RES32},
                                         n x {RES64}, global average pool, FC(C); BN, LeakyReLU (GAL)
``lenet5``                (1, 28, 28)    LeNet-5 (CLM): C(6,5,1,2)-ReLU-MP-C(16,5)-ReLU-MP-C(120,5)-ReLU-
                                         F(84)-ReLU-F(C)
``resnet18``              (3, 32, 32)    CIFAR ResNet-18 (CLM, LPD): C64, [2,2,2,2] basic blocks of
                                         64/128/256/512 channels, global average pool, F(512 -> C)
``d3-mnist``              (1, 28, 28)    Diverse Directions MNIST CNN (3 conv + 2 FC; widths unstated in
                                         the paper, ours as graddiv-mnist with ReLU): prefix C32-C64-MP,
                                         suffix C128-MP-F1024-F(C)
``d3-vgg16``              (3, 32, 32)    Diverse Directions BVGG16: ``vgg16``'s layers, prefix = conv
                                         blocks 1-4, suffix = conv block 5 and the classifier
========================  =============  ===========================================================

Residual blocks are the standard basic block (two 3x3 conv + BN, identity shortcut, or a 1x1
conv + BN projection when the shape changes). LeakyReLU slope: :data:`LEAKY_SLOPE` (papers silent).

``kind``:

* ``'deterministic'``: plain ``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm2d``.
* ``'bayes'``: the paper's Bayesian layers. Adv-BNN makes every conv, linear and BN layer Bayesian,
  and so do we for every architecture the Bayesian papers do not split (all but the ``d3-*`` ones;
  Conv-3/4, ResNets and LeNet-5 come from deterministic-ensemble papers, Bayesian here as Adv-BNN
  would). ``d3-*``: the suffix (the last conv and both FC for ``d3-mnist``; conv block 5, its BNs and
  the FC for ``d3-vgg16``, roughly the last quarter) is Bayesian, the prefix deterministic.
* ``'noise'``: RSE: a :class:`~fastdiv.nn.NoiseInjection` before every convolution that ``'bayes'``
  would make Bayesian (not before linear layers, as RSE), ``sigma_init`` on the network input and
  ``sigma_inner`` elsewhere. In residual blocks the noise is on the inputs of the two 3x3 convs; the
  shortcut takes the un-noised block input.

``d3-*`` models with a randomized ``kind`` wrap the deterministic prefix in :class:`SharedPrefix`,
which evaluates it once for all sample models when that is exact (see its docstring).

Input shapes. ``in_shape`` and ``num_classes`` are arguments; every architecture also runs on digits
(1, 8, 8) and MNIST (1, 28, 28) input (and any other size >= 1 pixel), by three rules applied while
the layers are laid out: a 2x2 pooling is skipped along a dimension already smaller than 2; an
unpadded convolution whose input is smaller than its kernel gets padding ``(kernel - 1) // 2`` (a
'same' convolution); the flattened feature size is computed from ``in_shape``. Global average
pooling replaces the fixed-size final pools (identical at the paper's shape). At the paper's input
shape none of the rules change anything.
"""
from __future__ import annotations

import torch
from torch import nn

from .._checks import check_positive
from .bayes import BayesBatchNorm2d, BayesConv2d, BayesLinear
from .noise import SIGMA_INIT, SIGMA_INNER, NoiseInjection
from .sampling import _UNSEEDED_RANDOM, RandomizedModule, is_randomized

__all__ = [
    "KINDS",
    "LEAKY_SLOPE",
    "MODELS",
    "PAPER_SHAPES",
    "Classifier",
    "InputCheck",
    "SharedPrefix",
    "build_model",
]

KINDS = ("deterministic", "bayes", "noise")

#: the architectures of :func:`build_model` and their papers' input shapes.
PAPER_SHAPES = {
    "graddiv-mnist": (1, 28, 28),
    "graddiv-stl10": (3, 96, 96),
    "vgg16": (3, 32, 32),
    "conv3": (1, 28, 28),
    "conv4": (3, 32, 32),
    "resnet20": (3, 32, 32),
    "resnet26": (3, 32, 32),
    "lenet5": (1, 28, 28),
    "resnet18": (3, 32, 32),
    "d3-mnist": (1, 28, 28),
    "d3-vgg16": (3, 32, 32),
}
MODELS = tuple(PAPER_SHAPES)

#: negative slope of the LeakyReLU of GradDiv's MNIST net and GAL's nets (neither paper gives it;
#: the PyTorch default).
LEAKY_SLOPE = 0.01


class InputCheck(nn.Module):
    """Identity that rejects input not shaped ``[N, *in_shape]`` with a message naming the expected
    shape (the first layer of every :class:`Classifier`)."""

    def __init__(self, in_shape: tuple[int, int, int], name: str = "model") -> None:
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"{self.name}: expected a floating-point input tensor, got {got}")
        if x.dim() != 1 + len(self.in_shape) or tuple(x.shape[1:]) != self.in_shape:
            expected = ", ".join(str(s) for s in self.in_shape)
            raise ValueError(f"{self.name}: expected input of shape [N, {expected}] (N images of shape "
                             f"{self.in_shape}), got {tuple(x.shape)}")
        return x

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}"


class SharedPrefix(RandomizedModule):
    """A deterministic ``module`` at the front of a randomized network, evaluated once for all sample
    models where that is exact (Defense through Diverse Directions: "the deterministic component is
    executed once per batch and the Bayesian component K times").

    In a batched sampling context the input is the batch replicated ``k`` times (``[k*B, ...]``, see
    :mod:`fastdiv.nn.sampling`); the prefix then runs on the first replica only and its output is
    repeated ``k`` times for the randomized layers after it. That is exact, and used, when the
    replicas cannot differ in anything that matters:

    * no input gradient is being recorded (``torch.no_grad()``, or an input that does not require
      grad: inference, prediction over sample models, a classification loss on parameters only,
      whose prefix parameter gradient is the sum over the ``k`` samples either way);
    * no BatchNorm in train mode and no active torch dropout inside the prefix.

    Otherwise it runs the prefix on all ``k*B`` rows like any other layer. Per-sample *input*
    gradients (:func:`fastdiv.sample_input_grads`, the diversity penalties, EOT attacks) need one
    backward path through the prefix per sample model: a shared forward would make autograd sum the
    ``k`` samples' gradients into the first replica. Either way the outputs equal the looped
    forward's.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"SharedPrefix: module must be an nn.Module, got {type(module).__name__}")
        if is_randomized(module):
            raise ValueError("SharedPrefix: module must be deterministic (it contains a RandomizedModule, whose "
                             "draws would be shared by all sample models)")
        self.module = module

    def shares(self, x: torch.Tensor) -> bool:
        """Whether a forward on ``x`` in the current context runs the prefix once."""
        if self.active_samples() == 1 or (torch.is_grad_enabled() and x.requires_grad):
            return False
        for m in self.module.modules():
            if m.training and (isinstance(m, nn.modules.batchnorm._BatchNorm)
                               or (isinstance(m, _UNSEEDED_RANDOM) and m.p > 0)):
                return False
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.active_samples()
        if not self.shares(x):
            return self.module(x)
        if x.shape[0] % k:
            raise ValueError(f"SharedPrefix: in a batched sampling context the input's dim 0 must be {k} * batch "
                             f"(the batch replicated once per sample model), got shape {tuple(x.shape)}")
        out = self.module(x[: x.shape[0] // k])
        return out.repeat(k, *([1] * (out.dim() - 1)))


class Classifier(nn.Module):
    """``head(body(input_check(x)))``: what :func:`build_model` returns.

    Attributes: ``name``, ``kind``, ``in_shape``, ``num_classes``; ``input_check``
    (:class:`InputCheck`), ``body`` (``nn.Sequential`` up to the features ``[N, head.in_features]``),
    ``head`` (the last linear layer, ``nn.Linear`` or :class:`~fastdiv.nn.BayesLinear`).
    """

    def __init__(self, name: str, kind: str, in_shape, num_classes: int, body: nn.Sequential, head: nn.Module):
        super().__init__()
        self.name, self.kind, self.in_shape, self.num_classes = name, kind, tuple(in_shape), num_classes
        self.input_check = InputCheck(in_shape, name)
        self.body = body
        self.head = head

    @property
    def num_features(self) -> int:
        """Width of the features the head sees."""
        return self.head.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.input_check(x)))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, kind={self.kind!r}, in_shape={self.in_shape}, num_classes={self.num_classes}"


# --------------------------------------------------------------------------------------------------
# Layout: layers appended in order while the feature-map shape is tracked.
# --------------------------------------------------------------------------------------------------


class _Layers:
    """Makes the kind-dependent layers; ``random=False`` asks for a deterministic layer whatever the kind."""

    def __init__(self, kind: str, sigma0: float, sigma_init: float, sigma_inner: float) -> None:
        self.kind, self.sigma0, self.sigma_init, self.sigma_inner = kind, sigma0, sigma_init, sigma_inner

    def conv(self, cin, cout, k, stride, padding, bias, random, at_input) -> list[nn.Module]:
        if random and self.kind == "bayes":
            return [BayesConv2d(cin, cout, k, stride, padding, bias=bias, sigma0=self.sigma0)]
        layers = []
        if random and self.kind == "noise":
            layers.append(NoiseInjection(self.sigma_init if at_input else self.sigma_inner))
        return layers + [nn.Conv2d(cin, cout, k, stride, padding, bias=bias)]

    def linear(self, cin, cout, random) -> nn.Module:
        if random and self.kind == "bayes":
            return BayesLinear(cin, cout, sigma0=self.sigma0)
        return nn.Linear(cin, cout)

    def bn(self, c, random) -> nn.Module:
        if random and self.kind == "bayes":
            return BayesBatchNorm2d(c, sigma0=self.sigma0)
        return nn.BatchNorm2d(c)


def _conv_out(size: int, k: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - k) // stride + 1


class _Stack:
    """A list of layers plus the shape ``(C, H, W)`` (or ``(F,)`` after flatten) of their output."""

    def __init__(self, make: _Layers, in_shape) -> None:
        self.make = make
        self.layers: list[nn.Module] = []
        self.shape = tuple(in_shape)
        self.at_input = True

    def conv(self, cout, k=3, stride=1, padding=1, *, bias=True, random=True) -> _Stack:
        c, h, w = self.shape
        if h + 2 * padding < k or w + 2 * padding < k:  # input smaller than the kernel: 'same' padding
            padding = max(padding, (k - 1) // 2)
        self.layers += self.make.conv(c, cout, k, stride, padding, bias, random, self.at_input)
        self.at_input = False
        self.shape = (cout, _conv_out(h, k, stride, padding), _conv_out(w, k, stride, padding))
        return self

    def bn(self, *, random=True) -> _Stack:
        self.layers.append(self.make.bn(self.shape[0], random))
        return self

    def act(self, kind: str) -> _Stack:
        self.layers.append(_activation(kind))
        return self

    def maxpool(self) -> _Stack:
        c, h, w = self.shape
        kh, kw = (2 if h >= 2 else 1), (2 if w >= 2 else 1)
        if (kh, kw) != (1, 1):  # skip a pool along a dimension already below 2
            self.layers.append(nn.MaxPool2d((kh, kw), (kh, kw)))
            self.shape = (c, h // kh, w // kw)
        return self

    def global_avgpool(self) -> _Stack:
        self.layers.append(nn.AdaptiveAvgPool2d(1))
        self.shape = (self.shape[0], 1, 1)
        return self

    def flatten(self) -> _Stack:
        self.layers.append(nn.Flatten(1))
        self.shape = (self.shape[0] * self.shape[1] * self.shape[2],)
        return self

    def linear(self, out, *, random=True) -> _Stack:
        self.layers.append(self.make.linear(self.shape[0], out, random))
        self.shape = (out,)
        return self

    def add(self, module: nn.Module, shape) -> _Stack:
        self.layers.append(module)
        self.shape = tuple(shape)
        self.at_input = False
        return self


def _activation(kind: str) -> nn.Module:
    return nn.LeakyReLU(LEAKY_SLOPE) if kind == "lrelu" else nn.ReLU()


class BasicBlock(nn.Module):
    """ResNet basic block: act(BN(conv3x3(act(BN(conv3x3(x))))) + shortcut(x)), the shortcut a 1x1
    conv + BN projection when the stride or width changes, else the identity."""

    def __init__(self, make: _Layers, in_shape, cout: int, stride: int, act: str, random: bool) -> None:
        super().__init__()
        main = _Stack(make, in_shape)
        main.at_input = False
        main.conv(cout, 3, stride, 1, bias=False, random=random).bn(random=random).act(act)
        main.conv(cout, 3, 1, 1, bias=False, random=random).bn(random=random)
        self.main = nn.Sequential(*main.layers)
        self.out_shape = main.shape
        cin = in_shape[0]
        if stride != 1 or cin != cout:
            # no noise before the projection: RSE's noise is on the 3x3 convs' inputs only
            layers = make.conv(cin, cout, 1, stride, 0, False, random and make.kind == "bayes", False)
            self.shortcut = nn.Sequential(*layers, make.bn(cout, random))
        else:
            self.shortcut = nn.Identity()
        self.act = _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.main(x) + self.shortcut(x))


def _resnet(s: _Stack, stem: int, stages, blocks, act: str) -> None:
    s.conv(stem, 3, 1, 1, bias=False).bn().act(act)
    for i, (width, count) in enumerate(zip(stages, blocks)):
        for j in range(count):
            block = BasicBlock(s.make, s.shape, width, 2 if (i > 0 and j == 0) else 1, act, True)
            s.add(block, block.out_shape)
    s.global_avgpool().flatten()


_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _vgg16(s: _Stack, random_from_block: int = 0, prefix_end: list | None = None) -> None:
    block = 0
    for v in _VGG16:
        if v == "M":
            s.maxpool()
            block += 1
            if prefix_end is not None and block == random_from_block:
                prefix_end.append(len(s.layers))
        else:
            random = block >= random_from_block
            s.conv(v, 3, 1, 1, random=random).bn(random=random).act("relu")
    s.global_avgpool().flatten()


def _layout(name: str, s: _Stack, num_classes: int) -> int | None:
    """Appends ``name``'s layers up to and including the head; returns the index where the suffix
    starts for the prefix/suffix (``d3-*``) models, else None."""
    if name in ("graddiv-mnist", "conv3"):
        s.conv(32).act("lrelu").conv(64).act("lrelu").maxpool().conv(128).act("lrelu").maxpool()
        s.flatten().linear(1024).act("lrelu").linear(num_classes)
    elif name == "graddiv-stl10":
        for width in (32, 64, 128, 256):
            s.conv(width).bn().act("relu").maxpool()
        s.conv(256, 3, 1, 0).bn().act("relu").conv(512, 3, 1, 0).bn().act("relu")
        s.global_avgpool().flatten().linear(num_classes)
    elif name == "vgg16":
        _vgg16(s)
        s.linear(num_classes)
    elif name == "conv4":
        s.conv(32).act("lrelu").conv(64).act("lrelu").conv(128).act("lrelu").maxpool()
        s.conv(128).act("lrelu").maxpool().flatten().linear(1024).act("lrelu").linear(num_classes)
    elif name in ("resnet20", "resnet26"):
        n = 3 if name == "resnet20" else 4
        _resnet(s, 16, (16, 32, 64), (n, n, n), "lrelu")
        s.linear(num_classes)
    elif name == "lenet5":
        s.conv(6, 5, 1, 2).act("relu").maxpool().conv(16, 5, 1, 0).act("relu").maxpool()
        s.conv(120, 5, 1, 0).act("relu").flatten().linear(84).act("relu").linear(num_classes)
    elif name == "resnet18":
        _resnet(s, 64, (64, 128, 256, 512), (2, 2, 2, 2), "relu")
        s.linear(num_classes)
    elif name == "d3-mnist":
        s.conv(32, random=False).act("relu").conv(64, random=False).act("relu").maxpool()
        split = len(s.layers)
        s.conv(128).act("relu").maxpool().flatten().linear(1024).act("relu").linear(num_classes)
        return split
    elif name == "d3-vgg16":
        marks: list[int] = []
        _vgg16(s, random_from_block=4, prefix_end=marks)
        s.linear(num_classes)
        return marks[0]
    else:  # pragma: no cover - names are checked by build_model
        raise AssertionError(name)
    return None


def _check_shape(in_shape, name: str):
    if in_shape is None:
        return PAPER_SHAPES[name]
    shape = tuple(in_shape) if isinstance(in_shape, (tuple, list, torch.Size)) else None
    if shape is None or len(shape) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in shape):
        raise ValueError(f"build_model: in_shape must be (C, H, W) with positive ints, got {in_shape!r}")
    return shape


def build_model(name: str, *, in_shape=None, num_classes: int = 10, kind: str = "deterministic",
                sigma0: float = 0.1, sigma_init: float = SIGMA_INIT, sigma_inner: float = SIGMA_INNER) -> Classifier:
    """The architecture ``name`` (one of :data:`MODELS`) as a :class:`Classifier`.

    Args:
        name: architecture (table in the module docstring).
        in_shape: ``(C, H, W)`` of one input image; default the paper's (:data:`PAPER_SHAPES`).
        num_classes: number of logits (>= 2).
        kind: 'deterministic', 'bayes' (Adv-BNN layers, see the module docstring for which) or
            'noise' (RSE noise layers).
        sigma0: prior (and initial posterior) standard deviation of the Bayesian layers (kind='bayes').
        sigma_init, sigma_inner: RSE noise standard deviation on the network input / inside (kind='noise').

    Returns a fresh model in train mode; parameters initialised as the torch / fastdiv.nn layers do
    (seed the global RNG for reproducible weights).
    """
    if name not in PAPER_SHAPES:
        raise ValueError(f"build_model: name must be one of {MODELS}, got {name!r}")
    if kind not in KINDS:
        raise ValueError(f"build_model: kind must be one of {KINDS}, got {kind!r}")
    shape = _check_shape(in_shape, name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"build_model: num_classes must be an int >= 2, got {num_classes!r}")
    make = _Layers(kind, check_positive(sigma0, "sigma0", "build_model"),
                   check_positive(sigma_init, "sigma_init", "build_model"),
                   check_positive(sigma_inner, "sigma_inner", "build_model"))
    stack = _Stack(make, shape)
    split = _layout(name, stack, num_classes)
    layers = stack.layers
    head, body = layers[-1], layers[:-1]
    if split is not None and kind != "deterministic":
        body = [SharedPrefix(nn.Sequential(*body[:split]))] + body[split:]
    return Classifier(name, kind, shape, num_classes, nn.Sequential(*body), head)
