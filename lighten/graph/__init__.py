"""Channel-dependency analysis: which tensors' channels must be pruned together.

One ``torch.fx`` trace plus shape propagation. Every traced value gets a *layout*: its channel
axis and the channel *spaces* (in order, with offsets) that make up that axis. Spaces that meet
at a residual add or a channel-wise multiply are merged (union-find); a concatenation lays spaces
side by side; a flatten before a Linear turns one channel into a block of H*W features.
Grouped convolutions and channel shuffles *tie* channels: a conv with ``g`` groups must keep the
same channels in every group, so channel ``c`` and ``c + C/g`` become copies of one channel (the
space is split into ``g`` copies); a shuffle then interleaves the copies (a block of ``g``).
Keeping the *same* channels per group (not merely as many) is stricter than needed but keeps
every member a plain (offset, block) slice, so importance, ``round_to`` and surgery need nothing
special: one group channel is g filters. Where the groups cannot be tied (a concat straddling
them) the conv is kept whole; a view that hard-codes a channel count pins those channels (or, in
a shuffle, is refused) because the pruned model would reshape wrongly. A transposed conv is a
conv whose weight holds its outputs on axis 1 (its members say ``transposed``). A parameter
combined per channel -- added, multiplied, or concatenated along another axis like a ViT cls
token, maybe after an ``expand``, indexed ``w[:, None, None]`` or viewed ``(1, -1, 1, 1)`` -- is
sliced with the channels. A ``chunk`` / ``split`` of the channel axis into parts the forward
computes (ShuffleNetV2's halves) ties the parts like a grouped conv's groups; a join that holds
runs of a space's channels as one (shuffled copies) *coarsens* that space. A mean over the
channel axis with ``keepdim`` (a LayerNorm written out) is a statistic: one pinned channel,
broadcast back. A call the tables lack -- a ``torch.fx.wrap``'d ``drop_path``, a leaf module
without a kind -- is run on random inputs: it is followed when it acts on each channel alone.
How channels flow through each operator is DATA (:data:`MODULE_KINDS`, :data:`FUNCTION_KINDS`,
:data:`METHOD_KINDS`); anything else that the probe cannot show to act per channel is refused
with an :class:`~lighten.errors.UnsupportedError` naming the node and the user's options.

The output is a plain list of :class:`Group`. Pruning algorithms consume it and never trace.

Where each part lives:

* :mod:`.groups` -- :class:`Member` / :class:`Group`, the output;
* :mod:`.facts` -- the operator tables: which *kind* each module type, function, method is;
* :mod:`.layout` -- a value's channel layout and the facts read from an fx node;
* :mod:`.spaces` -- channel spaces under union-find: merge, cut, tie, coarsen, pin, attach;
* :mod:`.analysis` -- the trace and the walk: kind -> handler (``HANDLERS``);
* the handlers, one module per operator family: :mod:`.ops_layers` (convs, Linear, norms),
  :mod:`.ops_shape` (same / reshape / permute / shuffle / reduce / index),
  :mod:`.ops_join` (elementwise, cat, expand, chunk / split), :mod:`.ops_params` (parameters
  met per channel, values derived from parameters), :mod:`.ops_attention` (attention, heads,
  token mixing), :mod:`.ops_opaque` (calls probed at run time).
"""

from lighten.graph.analysis import channel_groups
from lighten.graph.facts import FUNCTION_KINDS, METHOD_KINDS, MODULE_KINDS
from lighten.graph.groups import Group, Member

__all__ = ["FUNCTION_KINDS", "METHOD_KINDS", "MODULE_KINDS", "Group", "Member", "channel_groups"]
