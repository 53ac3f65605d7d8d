"""Attention heads of multi-head self-attention, found in the torch.fx graph.

Three forms are followed.

Written out with separate q, k and v Linears on (batch, tokens, dim), each viewed as (batch, tokens, heads,
head_dim) and transposed to (batch, heads, tokens, head_dim), q and k possibly rotated within each head
(rotary position embeddings, rotary.py); either q @ k^T (k transposed on its last two
axes), scaled by a number, softmaxed over the keys (dropout allowed), @ v, or F.scaled_dot_product_attention(q,
k, v); then transposed back, reshaped to (batch, tokens, heads * head_dim) and read by one output Linear. Every
value on the way has that one reader, so nothing else sees a head. Head h owns rows h*head_dim..(h+1)*head_dim
of q, k and v (and their biases) and those columns of the output projection: when they are zero, the head's
values are zero, so is what it adds to the output whatever its attention weights, and deleting it is exact.

Grouped-query attention (LLaMA 2/3, Mistral): k and v have fewer heads, each shared by R = heads / kv_heads
query heads, and are repeated before the attention by Hugging Face's repeat_kv (x[:, :, None].expand(b, kv, R,
s, d).reshape(b, kv * R, s, d)) or by repeat_interleave(R, dim=1). A key/value head goes with its R query heads
as one group: group g owns rows g*head_dim.. of k and v, the rows of query heads g*R..(g+1)*R - 1 of q and their
columns of the output projection. (F.scaled_dot_product_attention(..., enable_gqa=True) is not followed: the
legacy exporter refuses it, and dynamo below opset 23 folds the heads into the batch axis, where the surgery
does not cut them.)

Written out with one Linear whose features are split into q, k and v parts of their own widths
(qkv(x).split([heads * d, kv_heads * d, kv_heads * d], -1), as Phi-3 and GPT-BigCode write it), each part then
viewed as above: a group owns its rows of each part.

Written out with one packed qkv Linear (timm's form): qkv(x).reshape(batch, tokens, 3, heads, head_dim)
.permute(2, 0, 3, 1, 4), then q, k and v taken out by unbind(0) or by indexing 0, 1 and 2 (q and k possibly
rotated), and the same attention and projection as above. Head h owns rows p*dim + h*head_dim.. of qkv for each part p.

nn.MultiheadAttention called as self-attention (query, key and value one tensor, no masks, its attention
weights unused, packed in_proj_weight): one call_module node, which fx does not trace into. Head h owns rows
p*embed_dim + h*head_dim.. of in_proj_weight and in_proj_bias and those columns of out_proj.weight. Its
projections are not layers of the analysis (their MACs are the module's, see last_axis.matmul_macs), so a
head's MACs are all in `product_macs`, and thinning keeps its heads (`keeps_heads` says why).

Anything else (a mask tensor, heads mixed before the projection, attention weights read elsewhere) is not
recognised, and its features stay pinned by the walls of structure.py.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .last_axis import is_split, matmul_macs
from .rotary import reads_size, rotated_from

aten = torch.ops.aten
_MATMUL = {operator.matmul, torch.matmul, aten.matmul.default}
_SDPA = {F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default}
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SOFTMAX = {F.softmax, torch.softmax, aten.softmax.int, aten._softmax.default}
_SCALE = {operator.mul, operator.truediv, torch.mul, torch.div, aten.mul.Tensor, aten.div.Tensor}
_DROPOUT = {F.dropout, aten.dropout.default}
_MASKED_FILL = {torch.masked_fill, aten.masked_fill.Scalar}
_ADD = {operator.add, torch.add, aten.add.Tensor}
_CASTS = {aten.to.dtype, aten._to_copy.default}
# torch.export's checks of a value's dtype and device (Hugging Face's softmax(..., dtype=torch.float32).to(q.dtype)
# leaves one): they read nothing a forward computes with.
_CHECKS = {aten._assert_tensor_metadata.default}


@dataclass(frozen=True)
class Heads:
    """One attention: its projections, its heads and the module whose head count its forward reads."""

    # The Linears writing queries, keys and values: one Linear three times when packed, and for
    # nn.MultiheadAttention the module itself three times (its in_proj_weight holds all three).
    q: str
    k: str
    v: str
    proj: str  # the output projection
    num_heads: int
    head_dim: int
    owner: str | None  # the module holding `num_heads` (None: thinning cannot rewrite the head count)
    product_macs: int  # multiply-accumulates per sample that go with each group (head) beyond its rows of the layers
    row_params: tuple[str, ...] = ()  # the parameters whose rows the heads own
    # Where q, k and v start in a projection holding all three (timm's packed qkv and nn.MultiheadAttention:
    # 0, dim, 2 * dim; a split one: 0, q width, q + k width); (0,) for three Linears.
    part_offsets: tuple[int, ...] = (0,)
    row_layers: tuple[str, ...] = ()  # layers of the analysis those rows belong to (their MACs go with them)
    keeps_heads: str = ""  # why thinning leaves the heads in place, masked ('' where it cuts them)
    kv_heads: int = 0  # grouped-query attention: key/value heads, each shared by num_heads // kv_heads query heads
    kv_attr: str = ""  # the owner's attribute holding kv_heads, which thinning rewrites too
    heads_attr: str = "num_heads"  # the owner's attribute holding num_heads, which thinning rewrites
    # Parameters holding a bias per query head that the scores add (Swin's relative position bias table), each
    # with its heads axis: thinning slices the heads it cuts out of them.
    tables: tuple[tuple[str, int], ...] = ()
    width_attr: str = ""  # the owner's attribute holding heads * head_dim (transformers' all_head_size), if any

    @property
    def name(self) -> str:
        """The attention, as reports name it: the module holding the output projection."""
        return self.proj.rsplit(".", 1)[0]

    @property
    def col_param(self) -> str:
        return f"{self.proj}.weight"

    @property
    def groups(self) -> int:
        """What goes whole: a head, or in grouped-query attention a key/value head with its query heads."""
        return self.kv_heads or self.num_heads

    @property
    def per_group(self) -> int:
        """Query heads in each group."""
        return self.num_heads // self.groups

    def query_heads(self, groups) -> list[int]:
        return [g * self.per_group + i for g in sorted(groups) for i in range(self.per_group)]

    def cols(self, groups) -> list[int]:
        """Columns of the output projection that these groups' query heads own."""
        return [h * self.head_dim + d for h in self.query_heads(groups) for d in range(self.head_dim)]

    def rows(self, groups, of: str) -> list[int]:
        """Rows that these groups own of `of`, a row parameter or its Linear, ascending: the query heads' of q,
        the key/value heads' of k and v (the same heads but in grouped-query attention), each part's of a
        projection holding all three."""
        linear = of.removesuffix(".weight").removesuffix(".bias")
        q = self.cols(groups)
        kv = [g * self.head_dim + d for g in sorted(groups) for d in range(self.head_dim)] if self.kv_heads else q
        if len(self.part_offsets) == 3:
            q0, k0, v0 = self.part_offsets
            return sorted([q0 + r for r in q] + [k0 + r for r in kv] + [v0 + r for r in kv])
        return kv if linear in (self.k, self.v) else q


def is_zero(att: Heads, params: dict, h: int) -> bool:
    """Whether every weight group h owns is zero (a missing bias is)."""
    for name in att.row_params:
        t = params.get(name)
        if t is not None and bool(t.detach()[att.rows([h], name)].any()):
            return False
    return not bool(params[att.col_param].detach()[:, att.cols([h])].any())


def find(gm: fx.GraphModule, modules: dict, layers: dict, shape_of, batch: int, owners: dict) -> list[Heads]:
    """Every attention of those forms; `owners` are the model's own modules (the traced graph keeps only those
    it calls), where the one holding the head count is looked up."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = modules.get(str(node.target))
        if isinstance(mod, nn.MultiheadAttention):
            heads = _multihead(node, mod, modules, shape_of, batch)
        elif isinstance(mod, nn.Linear):
            heads = _attention_before(node, modules, layers, shape_of, batch, owners)
        else:
            heads = None
        if heads is not None:
            found.append(heads)
    return found


def _only_user(node: fx.Node) -> fx.Node | None:
    users = [u for u in node.users if not (u.op == "call_function" and u.target in _CHECKS)]
    return users[0] if len(users) == 1 else None


def _value_reader(node: fx.Node) -> fx.Node | None:
    """The one reader of the node's values, beside any that read only its sizes (`k.size(-1)` for the scale)."""
    readers = [u for u in node.users if not reads_size(u) and not (u.op == "call_function" and u.target in _CHECKS)]
    return readers[0] if len(readers) == 1 else None


def _is_method_or_fn(node: fx.Node, methods: tuple[str, ...], functions: set) -> bool:
    return (node.op == "call_method" and node.target in methods) or \
        (node.op == "call_function" and node.target in functions)


def _swaps(node: fx.Node, i: int, j: int, rank: int) -> bool:
    """transpose(i, j) or the permute that swaps only i and j."""
    if _is_method_or_fn(node, ("transpose",), {torch.transpose, aten.transpose.int}):
        dims = [d % rank for d in node.args[1:3] if isinstance(d, int)]
        return len(dims) == 2 and sorted(dims) == sorted((i, j))
    dims = _permute_dims(node, rank)
    if dims is not None:
        want = list(range(rank))
        want[i], want[j] = want[j], want[i]
        return dims == want
    return False


def _permute_dims(node: fx.Node, rank: int | None = None) -> list | None:
    """The dims of a permute (negative ones made positive where the rank is given); None for other nodes."""
    if not _is_method_or_fn(node, ("permute",), {torch.permute, aten.permute.default}):
        return None
    dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    return [d % rank if isinstance(d, int) and rank else d for d in dims]


def _is_reshape(node: fx.Node) -> bool:
    return _is_method_or_fn(node, ("view", "reshape"), {torch.reshape, aten.view.default, aten.reshape.default})


def _split_heads(node: fx.Node, modules: dict, layers: dict, shape_of) -> tuple[str, int, int, int] | None:
    """(Linear, heads, head_dim, first row) when `node` is Linear(x).view(b, s, heads, head_dim).transpose(1, 2),
    or the same of one part of Linear(x).split(sizes, -1) (its rows from the first row on)."""
    if not isinstance(node, fx.Node) or not _swaps(node, 1, 2, 4):
        return None
    view = node.args[0]
    found = _viewed_linear(view, layers, shape_of)
    found = (*found, 0) if found is not None else _viewed_part(view, layers, shape_of)
    if found is None or _only_user(view) is not node:
        return None
    name, src, out, first = found
    if len(src) != 3 or len(out) != 4 or out[:2] != src[:2] or out[2] * out[3] != src[2]:
        return None
    return name, out[2], out[3], first


def _viewed_part(view, layers: dict, shape_of) -> tuple[str, tuple[int, ...], tuple[int, ...], int] | None:
    """(Linear, the part's shape, the view's shape, the part's first row) when `view` reshapes one part of what
    a Linear called once wrote, split along its features (split or chunk) and read by nothing else; every part
    is read once, so the parts' widths give where each starts."""
    if not isinstance(view, fx.Node) or not _is_reshape(view):
        return None
    part = view.args[0]
    if not isinstance(part, fx.Node) or part.op != "call_function" or part.target is not operator.getitem or \
            _only_user(part) is not view:
        return None
    split = part.args[0]
    if not isinstance(split, fx.Node) or not is_split(split) or not isinstance(split.args[0], fx.Node):
        return None
    lin = split.args[0]
    lay, src = layers.get(str(lin.target)), shape_of(lin)
    if lin.op != "call_module" or _only_user(lin) is not split or lay is None or lay.kind != "linear" or \
            lay.calls != 1 or src is None:
        return None
    parts = {}
    for user in split.users:
        shape = shape_of(user)
        if user.op != "call_function" or user.target is not operator.getitem or not isinstance(user.args[1], int) \
                or shape is None or len(shape) != len(src) or tuple(shape[:-1]) != tuple(src[:-1]):
            return None
        parts[user.args[1] % len(split.users)] = shape[-1]
    if sorted(parts) != list(range(len(parts))) or sum(parts.values()) != src[-1]:
        return None  # a part left unread, or a split along another axis
    index = part.args[1] % len(parts)
    return str(lin.target), tuple(shape_of(part)), shape_of(view), sum(parts[i] for i in range(index))


def _viewed_linear(view, layers: dict, shape_of) -> tuple[str, tuple[int, ...], tuple[int, ...]] | None:
    """(Linear, its input shape, the view's shape) when `view` reshapes what a Linear called once wrote and
    nothing else reads: the one projection whose rows the heads own."""
    if not isinstance(view, fx.Node) or not _is_reshape(view):
        return None
    lin = view.args[0]
    if not isinstance(lin, fx.Node) or lin.op != "call_module" or _value_reader(lin) is not view:
        return None
    name = str(lin.target)
    lay = layers.get(name)
    src, out = shape_of(lin), shape_of(view)
    if lay is None or lay.kind != "linear" or lay.calls != 1 or src is None or out is None:
        return None
    return name, src, out


def _scores_source(node: fx.Node, modules: dict, shape_of) -> tuple[fx.Node, tuple[tuple[str, int], ...]] | None:
    """Back from what @ v reads, through dropout, softmax over the keys, scaling by a number, a mask the same
    for every head (added, or by masked_fill with a number; a causal mask) and a bias per head taken from a
    parameter (Swin's relative position bias): q @ k^T, and each such parameter with its heads axis. Views that
    regroup the axes before (heads, queries, keys) pass (Swin adds its mask per window in a 5-D view)."""
    at = node
    seen_softmax = False
    tables: list[tuple[str, int]] = []
    while isinstance(at, fx.Node):
        nxt = at.args[0] if at.args else None
        if at.op == "call_module" and isinstance(modules.get(str(at.target)), nn.Dropout) or \
                at.op == "call_function" and at.target in _DROPOUT or _is_cast(at):
            pass  # elementwise: each head's weights stay its own
        elif _is_reshape(at) and _regroups_batch(at, shape_of):
            pass
        elif _is_method_or_fn(at, ("softmax",), _SOFTMAX):
            dim = at.args[1] if len(at.args) > 1 else at.kwargs.get("dim")
            if dim not in (-1, 3) or seen_softmax:
                return None
            seen_softmax = True
        elif _is_method_or_fn(at, ("mul", "div"), _SCALE):
            if len(at.args) < 2 or not (isinstance(at.args[1], (int, float)) or _from_sizes(at.args[1])):
                return None
        elif _is_method_or_fn(at, ("masked_fill",), _MASKED_FILL):
            if len(at.args) != 3 or not isinstance(at.args[2], (int, float)) or \
                    not _broadcasts_over_heads(at.args[1], shape_of):
                return None
        elif _is_method_or_fn(at, ("add",), _ADD) and len(at.args) == 2 and not at.kwargs:
            # scores + mask, either way round: the mask is the operand that broadcasts over the heads, or the
            # bias whose heads are those of a parameter.
            masks = [i for i, a in enumerate(at.args) if _broadcasts_over_heads(a, shape_of)]
            found = [(i, t) for i, a in enumerate(at.args) if not masks and isinstance(a, fx.Node)
                     for t in [_per_head_table(a, at, shape_of)] if t is not None]
            if len(masks) + len(found) != 1:
                return None
            if found:
                tables.append(found[0][1])
            nxt = at.args[1 - (masks or [found[0][0]])[0]]
        elif _is_method_or_fn(at, ("matmul",), _MATMUL):
            return (at, tuple(tables)) if seen_softmax else None
        else:
            return None
        if not isinstance(nxt, fx.Node) or _only_user(nxt) is not at:
            return None
        at = nxt
    return None


def _is_cast(node: fx.Node) -> bool:
    """A change of dtype (`.to(torch.float32)`, `.float()`), nothing else."""
    if node.op == "call_method":
        return node.target in ("float", "half", "bfloat16") or \
            node.target == "to" and len(node.args) == 2 and isinstance(node.args[1], torch.dtype)
    if node.op != "call_function" or node.target not in _CASTS:
        return False
    return set(node.kwargs) <= {"dtype", "copy", "non_blocking"} and node.kwargs.get("copy") in (None, False) and \
        (node.target is aten._to_copy.default or len(node.args) == 2 and isinstance(node.args[1], torch.dtype))


def _broadcasts_over_heads(node, shape_of) -> bool:
    """A tensor of size 1 on the heads axis of (..., heads, queries, keys), or of no such axis: a mask that
    treats every head alike."""
    shape = shape_of(node) if isinstance(node, fx.Node) else None
    return shape is not None and (len(shape) < 3 or shape[-3] == 1)


def _regroups_batch(node: fx.Node, shape_of) -> bool:
    """A view of scores that keeps (heads, queries, keys) and regroups the axes before them alone."""
    src = node.args[0] if node.args else None
    a, b = shape_of(node), shape_of(src) if isinstance(src, fx.Node) else None
    return a is not None and b is not None and len(a) >= 3 and len(b) >= 3 and a[-3:] == b[-3:]


_INDEX = {operator.getitem, aten.index.Tensor}
_UNSQUEEZE = {torch.unsqueeze, aten.unsqueeze.default}
_SAME_VALUES = {aten.clone.default, aten.contiguous.default, aten.alias.default}


def _per_head_table(node: fx.Node, add: fx.Node, shape_of) -> tuple[str, int] | None:
    """The parameter a bias added to the scores at `add` (or passed as sdpa's mask) is taken from, and the
    parameter's axis that runs along the scores' heads: followed back through unsqueeze, permute, contiguous,
    views that keep that axis whole, the sum with a mask the same for every head, and an index of the
    parameter's first axis by a tensor (Swin's table[index.view(-1)].view(n, n, -1).permute(2, 0, 1)
    .unsqueeze(0)). Every value on the way has this one reader, and the parameter is read nowhere else, so
    slicing its heads changes this bias alone."""
    scores, shape = shape_of(add), shape_of(node)
    if scores is None or shape is None or len(shape) < 3 or len(shape) > len(scores) or shape[-3] != scores[-3]:
        return None
    axis, at, reader = len(shape) - 3, node, add
    while isinstance(at, fx.Node) and _only_user(at) is reader:
        out = shape_of(at)
        src = at.args[0] if at.args else None
        if at.op == "get_attr":
            owning = at.graph.owning_module
            readers = [n for n in at.graph.nodes if n.op == "get_attr" and n.target == at.target]
            try:
                param = owning.get_parameter(str(at.target)) if owning is not None and len(readers) == 1 else None
            except AttributeError:
                return None  # a buffer (a per-head mask the model holds): no parameter the training would slice
            return (str(at.target), axis) if param is not None and param.shape[axis] == scores[-3] else None
        if not isinstance(src, fx.Node) or out is None:
            return None
        if _is_method_or_fn(at, ("contiguous", "clone"), _SAME_VALUES):
            pass
        elif _is_method_or_fn(at, ("add",), _ADD) and len(at.args) == 2 and not at.kwargs:
            # bias + a mask the same for every head (transformers' Swin adds its window mask to the bias first)
            per_head = [a for a in at.args if isinstance(a, fx.Node) and not _broadcasts_over_heads(a, shape_of)]
            if len(per_head) != 1 or shape_of(per_head[0]) is None:
                return None
            src = per_head[0]
            axis -= len(out) - len(shape_of(src))
            if axis < 0 or shape_of(src)[axis] != out[axis + len(out) - len(shape_of(src))]:
                return None
        elif _is_method_or_fn(at, ("unsqueeze",), _UNSQUEEZE):
            d = at.args[1] % len(out) if len(at.args) > 1 and isinstance(at.args[1], int) else None
            if d is None or d == axis:
                return None
            axis -= d < axis
        elif _permute_dims(at, len(out)) is not None:
            axis = _permute_dims(at, len(out))[axis]
        elif _is_reshape(at):
            axis = _same_axis(shape_of(src), out, axis)
        elif at.op == "call_function" and at.target in _INDEX and len(at.args) == 2:
            index = at.args[1][0] if isinstance(at.args[1], (list, tuple)) and len(at.args[1]) == 1 else at.args[1]
            picked = shape_of(index) if isinstance(index, fx.Node) else None
            if picked is None or axis < len(picked):
                return None  # the heads axis comes from the index, or the index is no tensor
            axis = axis - len(picked) + 1
        else:
            return None
        if axis is None:
            return None
        at, reader = src, at
    return None


def _same_axis(before: tuple[int, ...] | None, after: tuple[int, ...], axis: int) -> int | None:
    """The axis of a view's input that its output's `axis` is, where the view keeps that axis whole."""
    if before is None:
        return None
    lead = math.prod(after[:axis])
    for j, size in enumerate(before):
        if math.prod(before[:j]) == lead and size == after[axis]:
            return j
    return None


_SIZE_ARITHMETIC = {math.sqrt, operator.truediv, operator.mul, operator.floordiv, operator.pow, operator.getitem}


def _from_sizes(node) -> bool:
    """A number computed from tensors' sizes alone (1.0 / math.sqrt(k.size(-1))): one scale for every head."""
    if not isinstance(node, fx.Node):
        return isinstance(node, (int, float))
    if reads_size(node):
        return True
    return node.op == "call_function" and node.target in _SIZE_ARITHMETIC and \
        all(_from_sizes(a) for a in node.args)


def _attention_before(proj: fx.Node, modules: dict, layers: dict, shape_of, batch: int,
                      owners: dict) -> Heads | None:
    name = str(proj.target)
    lay = layers.get(name)
    merged = proj.args[0] if proj.args else None
    if lay is None or lay.calls != 1 or not isinstance(merged, fx.Node) or not _is_reshape(merged):
        return None
    back = merged.args[0]
    # Sizes may be read (`context.view(context.size()[:-2] + (width,))`, as transformers writes the merge).
    if not isinstance(back, fx.Node) or _value_reader(back) is not merged or _only_user(merged) is not proj:
        return None
    if _is_method_or_fn(back, ("contiguous",), {aten.contiguous.default}):
        back = back.args[0]
    if not isinstance(back, fx.Node) or not _swaps(back, 1, 2, 4):
        return None
    out = back.args[0]
    if not isinstance(out, fx.Node) or _only_user(out) is not back:
        return None
    if _is_reshape(out) and isinstance(out.args[0], fx.Node) and shape_of(out) == shape_of(out.args[0]) and \
            _only_user(out.args[0]) is out:
        out = out.args[0]  # a reshape to its own shape (Hugging Face's sdpa path writes one): nothing moves
    if out.op == "call_function" and out.target in _SDPA:
        # torch.export's aten call passes the defaults positionally: (q, k, v, None, 0.0, is_causal).
        if len(out.args) > len(_SDPA_ARGS) or set(out.kwargs) - set(_SDPA_ARGS):
            return None
        call = dict(zip(_SDPA_ARGS, out.args)) | dict(out.kwargs)
        mask = call.get("attn_mask")
        table = _per_head_table(mask, out, shape_of) if isinstance(mask, fx.Node) else None
        if any(a not in call for a in _SDPA_ARGS[:3]) or call.get("enable_gqa") or \
                (mask is not None and not _broadcasts_over_heads(mask, shape_of) and table is None):
            return None  # a mask per head (or one the analysis cannot see) would tie it to its heads
        q4, k4, v4 = (call[a] for a in _SDPA_ARGS[:3])
        products, tables = [out], (table,) if table is not None else ()
    elif _is_method_or_fn(out, ("matmul",), _MATMUL) and len(out.args) == 2:
        probs, v4 = out.args
        if not isinstance(probs, fx.Node) or _only_user(probs) is not out:
            return None  # attention weights read elsewhere too (returned, say) would change with the heads
        source = _scores_source(probs, modules, shape_of)
        scores, tables = source or (None, ())
        if scores is None or len(scores.args) != 2:
            return None
        q4, kt = scores.args
        if not isinstance(kt, fx.Node) or not _swaps(kt, 2, 3, 4) or _only_user(kt) is not scores:
            return None
        k4 = kt.args[0]
        products = [scores, out]
    else:
        return None
    parts = (q4, k4, v4)
    if not all(isinstance(n, fx.Node) and _value_reader(n) is not None for n in parts):
        return None
    found = _separate_heads(parts, modules, layers, shape_of) or _packed_heads(parts, layers, shape_of)
    if found is None:
        return None
    (q, k, v), heads, dim, offsets, kv_heads = found
    merged_shape = shape_of(merged)
    if name in (q, k, v) or merged_shape is None or merged_shape[-1] != heads * dim or \
            layers[name].weight_shape[1] != heads * dim:
        return None
    macs = sum(matmul_macs(p, shape_of, batch, modules) for p in products)
    linears = tuple(dict.fromkeys((q, k, v)))
    owner = _owner(owners, (*linears, name), heads)
    kv_attr = _attr_holding(owners.get(owner), KV_HEAD_ATTRS, kv_heads) if kv_heads and owner is not None else ""
    count_attr = _attr_holding(owners.get(owner), HEAD_ATTRS, heads) if owner is not None else ""
    width_attr = _attr_holding(owners.get(owner), WIDTH_ATTRS, heads * dim) if owner is not None else ""
    why = _why_kept(owner, heads, merged, width_attr) or (
        f"no attribute of {owner} holds its {kv_heads} key/value heads ({', '.join(KV_HEAD_ATTRS)}) for thinning "
        "to rewrite" if kv_heads and not kv_attr else "")
    return Heads(q, k, v, name, heads, dim, owner, macs // (kv_heads or heads),
                 row_params=tuple(f"{lin}.{leaf}" for lin in linears for leaf in ("weight", "bias")),
                 part_offsets=offsets, row_layers=linears, keeps_heads=why, kv_heads=kv_heads, kv_attr=kv_attr,
                 heads_attr=count_attr or "num_heads", tables=tables, width_attr=width_attr)


def _separate_heads(parts, modules: dict, layers: dict, shape_of):
    """((q, k, v), heads, head_dim, part offsets, key/value heads or 0) when q, k and v are three Linears (or
    three parts of one Linear's features), each split into heads, k and v possibly with fewer heads repeated for
    the query heads (grouped-query attention)."""
    q4, k4, v4 = parts
    (k4, k_copies), (v4, v_copies) = (_unrepeated(n, shape_of) or (n, 1) for n in (k4, v4))
    # Queries and keys may be rotated first (rotary position embeddings, rotary.py): the heads are the rotation's.
    split = [_split_heads(rotated_from(n, shape_of) or n, modules, layers, shape_of) for n in (q4, k4, v4)]
    if any(p is None for p in split):
        return None
    (q, heads, dim, q0), (k, hk, dk, k0), (v, hv, dv, v0) = split
    if k_copies != v_copies or (hk * k_copies, dk) != (heads, dim) or (hv, dv) != (hk, dk):
        return None
    kv_heads = hk if k_copies > 1 else 0
    if len({q, k, v}) == 3:
        return (q, k, v), heads, dim, (0,), kv_heads
    if len({q, k, v}) == 1 and len({q0, k0, v0}) == 3:
        return (q, k, v), heads, dim, (q0, k0, v0), kv_heads  # one Linear split into q, k and v
    return None


def _unrepeated(node: fx.Node, shape_of) -> tuple[fx.Node, int] | None:
    """(x, R) when `node` repeats each head of x (batch, kv_heads, tokens, head_dim) R times in place, read by
    nothing else: Hugging Face's repeat_kv, x[:, :, None].expand(b, kv, R, s, d).reshape(b, kv * R, s, d)
    (or unsqueeze(2), or flatten(1, 2)), or x.repeat_interleave(R, dim=1)."""
    out = shape_of(node)
    if out is None or len(out) != 4:
        return None
    if _is_method_or_fn(node, ("repeat_interleave",), {torch.repeat_interleave, aten.repeat_interleave.self_int}):
        x = node.args[0]
        copies = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        src = shape_of(x) if isinstance(x, fx.Node) else None
        if not isinstance(copies, int) or copies < 2 or dim not in (1, -3) or src is None or \
                tuple(src) != (out[0], out[1] // copies, *out[2:]) or _value_reader(x) is not node:
            return None
        return x, copies
    if not _is_reshape(node) and not _flattens_1_2(node):
        return None
    expand = node.args[0]
    if not isinstance(expand, fx.Node) or not _is_method_or_fn(expand, ("expand",), {aten.expand.default}) or \
            _only_user(expand) is not node:
        return None
    wide, one = shape_of(expand), expand.args[0]
    if wide is None or len(wide) != 5 or not isinstance(one, fx.Node) or _only_user(one) is not expand or \
            tuple(wide) != (out[0], wide[1], wide[2], *out[2:]) or wide[1] * wide[2] != out[1] or wide[2] < 2:
        return None
    x = _unsqueezed_at_2(one)
    if x is None or shape_of(x) is None or tuple(shape_of(x)) != (out[0], wide[1], *out[2:]) or \
            _value_reader(x) is not one:
        return None
    return x, wide[2]


def _flattens_1_2(node: fx.Node) -> bool:
    """x.flatten(1, 2): the copies merged into the heads axis as a reshape would."""
    if not _is_method_or_fn(node, ("flatten",), {torch.flatten, aten.flatten.using_ints}):
        return False
    names = ("input", "start_dim", "end_dim")
    call = dict(zip(names, node.args)) | dict(node.kwargs)
    return call.get("start_dim") == 1 and call.get("end_dim") in (2, -3)


def _unsqueezed_at_2(node: fx.Node) -> fx.Node | None:
    """x for x.unsqueeze(2) or x[:, :, None] (trailing slices allowed)."""
    if _is_method_or_fn(node, ("unsqueeze",), {torch.unsqueeze, aten.unsqueeze.default}):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return node.args[0] if dim == 2 and isinstance(node.args[0], fx.Node) else None
    if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
        return None
    x, index = node.args
    whole = slice(None, None, None)
    if not isinstance(x, fx.Node) or not isinstance(index, tuple) or len(index) < 3 or \
            index[:3] != (whole, whole, None) or any(i not in (whole, Ellipsis) for i in index[3:]):
        return None
    return x


def _packed_heads(parts, layers: dict, shape_of):
    """((qkv,) * 3, heads, head_dim, part offsets) when q, k and v are parts 0, 1 and 2 (in any order) of one
    Linear(x).reshape(b, s, 3, heads, head_dim).permute(2, 0, 3, 1, 4), taken by unbind(0) or by indexing."""
    picked = [_picked_part(rotated_from(n, shape_of) or n) for n in parts]
    if any(p is None for p in picked) or len({src for src, _ in picked}) != 1 or \
            sorted(i for _, i in picked) != [0, 1, 2]:
        return None
    src = picked[0][0]
    if len(src.users) != 3:
        return None  # a part read elsewhere too would change with the heads
    stacked = src.args[0] if _is_unbind(src) else src
    if not isinstance(stacked, fx.Node) or _permute_dims(stacked, 5) != [2, 0, 3, 1, 4] or \
            (stacked is not src and _only_user(stacked) is not src):
        return None
    view = stacked.args[0]
    found = _viewed_linear(view, layers, shape_of)
    if found is None or _only_user(view) is not stacked:
        return None
    name, into, out = found
    if len(into) != 3 or len(out) != 5 or out[:3] != (*into[:2], 3) or 3 * out[3] * out[4] != into[2]:
        return None
    width = out[3] * out[4]
    return (name,) * 3, out[3], out[4], (0, width, 2 * width), 0


def _is_unbind(node: fx.Node) -> bool:
    """unbind along dim 0."""
    if not _is_method_or_fn(node, ("unbind",), {torch.unbind, aten.unbind.int}):
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim == 0


def _picked_part(node: fx.Node) -> tuple[fx.Node, int] | None:
    """(the stacked value, the part) for x[i], unbind(x, 0)[i] or x.select(0, i)."""
    if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2:
        src, index = node.args
        return (src, index) if isinstance(src, fx.Node) and isinstance(index, int) else None
    if _is_method_or_fn(node, ("select",), {torch.select, aten.select.int}) and len(node.args) == 3:
        src, dim, index = node.args
        return (src, index) if isinstance(src, fx.Node) and dim == 0 and isinstance(index, int) else None
    return None


def _why_kept(owner: str | None, heads: int, merged: fx.Node, width_attr: str = "") -> str:
    """Why thinning cannot cut this attention's heads ('' where it can)."""
    if owner is None:
        return f"no module holding both projections has a head count of {heads} ({', '.join(HEAD_ATTRS)}) " \
               "for its forward to read"
    sizes = merged.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = sizes[0]
    if isinstance(merged.target, torch._ops.OpOverload) and not (sizes and sizes[-1] == -1) and not width_attr:
        # torch.export records every size as a number: whether the forward computes the merged width from
        # num_heads or reads it off a tensor (x.size(), which fewer heads would not fill) is lost. A -1 is
        # the forward's own (Hugging Face's reshape(*input_shape, -1)): whatever heads are kept fill it. An
        # owner holding the merged width (transformers 4.x's all_head_size, which thinning rewrites) is taken
        # to be where the number comes from; thinning's check of the outputs undoes it where it is not.
        return "its graph comes from torch.export, where the width the heads are merged back to is a number " \
               "whose source (num_heads or a tensor's size) is not recorded"
    if sizes and isinstance(sizes[-1], fx.Node) and _reads_a_size(sizes[-1]):
        # timm's reshape(B, N, C) with C = x.shape[-1]: the heads a thinned attention keeps would not fill C.
        return "its forward reshapes the heads back to the input's width (reshape(B, N, C) with C read from a " \
               "shape), which fewer heads do not fill"
    return ""


def _reads_a_size(node: fx.Node) -> bool:
    """x.shape[i] or x.size(i): a width the forward reads off a tensor, not one it computes from num_heads."""
    if node.op == "call_method" and node.target == "size" and len(node.args) > 1:
        return True
    if node.op != "call_function" or node.target is not operator.getitem or not node.args:
        return False
    src = node.args[0]
    return isinstance(src, fx.Node) and (
        (src.op == "call_function" and src.target is getattr and src.args[1:] == ("shape",))
        or (src.op == "call_method" and src.target == "size" and len(src.args) == 1))


def _multihead(node: fx.Node, mha: nn.MultiheadAttention, modules: dict, shape_of, batch: int) -> Heads | None:
    """nn.MultiheadAttention as self-attention without masks, its attention weights unused."""
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")
    call = dict(zip(names, node.args)) | dict(node.kwargs)
    q = call.get("query")
    if not isinstance(q, fx.Node) or call.get("key") is not q or call.get("value") is not q or \
            any(call.get(k) is not None for k in ("key_padding_mask", "attn_mask")) or call.get("is_causal"):
        return None
    if not mha._qkv_same_embed_dim or mha.in_proj_weight is None or mha.bias_k is not None or mha.add_zero_attn:
        return None  # separate q/k/v weights, or a key and value added to every head's: another form
    if not node.users or not all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0
                                 for u in node.users):
        return None  # attention weights read would change with the heads
    if call.get("need_weights", True) is not False:
        # Computing the averaged weights (the default), even unread, exports another graph (bmm, softmax
        # over heads folded into the batch) whose heads the surgery does not cut: no group the export
        # would keep while the budget counts it gone.
        return None
    macs = matmul_macs(node, shape_of, batch, modules)
    heads, dim, name = mha.num_heads, mha.embed_dim, str(node.target)
    if not macs:
        return None
    return Heads(name, name, name, f"{name}.out_proj", heads, mha.head_dim, None, macs // heads,
                 row_params=(f"{name}.in_proj_weight", f"{name}.in_proj_bias"), part_offsets=(0, dim, 2 * dim),
                 keeps_heads="nn.MultiheadAttention cannot hold an inner width other than its embed_dim (q, k, v "
                             "and out_proj all have it), so its zero heads stay in place, masked; the export "
                             "deletes them")


HEAD_ATTRS = ("num_heads", "n_head", "n_heads", "num_attention_heads")  # torch, nanoGPT, LLaMA's reference, HF
KV_HEAD_ATTRS = ("num_kv_heads", "n_kv_heads", "num_key_value_heads", "kv_heads")
# The merged width, where a forward reshapes its heads back to it (transformers' view(... + (all_head_size,))).
WIDTH_ATTRS = ("all_head_size",)


def _attr_holding(module: nn.Module | None, names: tuple[str, ...], count: int) -> str:
    """The first of `names` that `module` holds with the value `count` ('' where none does): where its forward
    reads a head count that thinning must rewrite."""
    return next((a for a in names if getattr(module, a, None) == count), "")


def _owner(modules: dict, names: tuple[str, ...], heads: int) -> str | None:
    """The closest module above all four Linears that holds the head count (as one of HEAD_ATTRS)."""
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for tokens in zip(*parts):
        if len(set(tokens)) != 1:
            break
        common.append(tokens[0])
    while True:
        prefix = ".".join(common)
        mod = modules.get(prefix)
        if mod is not None and not isinstance(mod, nn.MultiheadAttention) and _attr_holding(mod, HEAD_ATTRS, heads):
            return prefix
        if not common:
            return None
        common.pop()
