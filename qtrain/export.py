"""Export a trained model to packed low-bit layers; save / load them with safetensors.

The public names of the export, from their modules: :mod:`qtrain.export_pack` (what gets
packed: :func:`pack_model`, :func:`check_packable`), :mod:`qtrain.export_spec` (what the file
records about layers and run: :func:`packed_specs`, :data:`ACT_QUANTIZERS`, :func:`run_info`),
:mod:`qtrain.export_file` (the safetensors file and its size: :func:`save_packed`,
:func:`checksum`, :func:`storage_bits`) and :mod:`qtrain.export_load` (loading it back:
:func:`load_packed`, :func:`load_run`). Which quantized layer becomes which packed format is
registered once per quantizer / layer kind in :mod:`qtrain.nn.packed_registry`.

* :func:`pack_model` returns a copy of the model in which
  - fake-quant layers (``QuantLinear`` / ``QuantConv2d``) whose weight quantizer has
    ``export_qparams`` (``UniformQuantizer``) become :class:`PackedLinear` /
    :class:`PackedConv2d` with exactly the trained integer codes and scales (the trained
    activation quantizer is kept and applied to the input),
  - fake-quant layers whose weight quantizer is a ``PowerOfTwoQuantizer`` (what
    :class:`qtrain.callbacks.inq.INQCallback` leaves) become ``fmt="pow2"`` packed layers:
    ``b`` bits per weight (sign + exponent index incl. zero, INQ eq. (2)-(3)) as bit planes
    plus the int8 exponent n1 of the layer -- the ``b * numel + 8`` bits the run summary
    reports, up to < 32 bits of padding per plane. They run by dequantizing to a float
    weight (pure torch; no Triton kernel for this format),
  - fake-quant Linear / Conv2d / Embedding layers whose weight quantizer is a
    ``QuantNoiseQuantizer`` (Fan et al. 2020) become their fully quantized (p = 1) model:
    int8 / int4 as the symmetric ``uniform`` format with the forward's exact codes and float32
    scales (per tensor or per output channel; a per-tensor scale is stored once per row), 'pq'
    as the ``codebook`` format from the quantizer's centroids and assignments (fitted first
    if it never ran; centroids in float16 as the run summary counts them). Embeddings become
    :class:`PackedEmbedding` (same formats, rows = output channels),
  - uniform-quantized embeddings (``QuantEmbedding`` with a ``UniformQuantizer``: per tensor,
    per row (``axis=0``) or per group along the embedding dim; e.g. the QAT callback with
    types [Embedding]) become :class:`PackedEmbedding` through the same path as
    ``QuantLinear`` (rows = table rows; a per-tensor scale is stored once per row). Other
    quantized embeddings (e.g. power-of-two) are left as they are,
  - fake-quant Linear / Conv2d / Embedding layers whose weight quantizer is a Q-BERT
    ``GroupwiseQuantizer`` (Shen et al. 2019; each group is a block of whole rows) become the
    ``uniform`` per-channel format, every row holding its group's scale / zero-point
    (``scale_dtype``) and the forward's exact codes,
  - fake-quant Linear / Conv2d / Embedding layers whose weight quantizer is one of the
    learned / float / bucketed / calibrated / value-aware quantizers are packed by
    :func:`qtrain.nn.packed_formats.pack_weight` with the quantizer's eval-mode weight:
    DoReFa (k-bit: ``lut`` codes into the table 2 (u / (2^k - 1)) - 1; 1 bit: ``binary``),
    DSQ (hard test-time value: ``lut`` codes into the table l + Delta u; both tables computed
    with the forward's float32 operations: bit-exact),
    TTQ / scalar soft-to-hard VQ (``lut``: codes into the {-W_n, 0, W_p} table or the
    centres; bit-exact), Polino differentiable (``bucketed`` with the learned points as a
    ``lut`` and alpha, beta per bucket; ``lut`` with bucket_size=None; bit-exact), vector
    soft-to-hard VQ (``codebook``), Polino bucketed min-max (``uniform`` per group when the bucket size
    divides the row length, else ``bucketed``: buckets of the flattened weight, torch only),
    dynamic fixed point (``uniform`` symmetric with scale 2^E up to 8 bits, else ``float``
    int16 / int32 codes), FloatQuantizer / FP8 training (``float``: the weight in its torch
    dtype fp16 / bf16 / float8_e4m3fn / float8_e5m2; bit-exact), S2FP8 (``float``: the E5M2
    values plus alpha, beta), calibrated uniform (``uniform``) and value-aware
    (``value_aware``: dense uniform codes + sparse float32 outliers). Stochastic rounding is
    packed with round-to-nearest. See :mod:`qtrain.nn.packed_formats` for the exactness of
    each format; the packer raises if its weight drifts from the quantizer's own output,
  - PQ layers (duck-typed: ``centroids`` (n_centroids x bs), ``assignments``, ``block_size``,
    ``weight_from_codebook()``) become codebook layers,
  - residual-quantized layers (:mod:`qtrain.nn.rq_layers`, Gong et al. 2014) become ``rq``
    layers (per-stage uint8 codes + fp16 codebooks, :mod:`qtrain.nn.packed_rq`), scalar
    k-means weight sharing (``KMeansWeightQuantizer``) the ``lut`` format (b-bit codes + an
    fp16 table of the shared values; bit-exact),
  - Deep Compression layers (``SharedWeightQuantizer``, Han et al. 2016) become
    ``sparse_shared`` layers (relative-index + code bit streams, fp32 codebook; torch only;
    :mod:`qtrain.nn.packed_sparse`),
  - plain ``nn.Linear`` layers are packed with min-max uniform quantization when ``bits`` is
    given, else left in float.
  Per-tensor parameters are stored once per row (the formats keep one scale per row), and
  3-bit / 5..7-bit codes travel in 4- / 8-bit containers: the file then exceeds the run
  summary's storage bits by those copies and the container padding.
  Every other module, parameter and buffer (BatchNorm running statistics included) is kept.
  Layers packed from one tied float Parameter into equal buffers share them (written once).
  PQ layers tied to another layer (an LM's embedding and output projection sharing one
  ``centroids`` Parameter, :func:`qtrain.nn.pq_layers.pq_tied`) stay PQ layers, so the tie
  and its single codebook survive export.
* :func:`save_packed` writes one ``.safetensors`` file (atomically): every tensor of the state
  dict plus metadata (format version, bit layout, file version, per-layer specs with what each
  layer was packed from and its activation quantizer, the run's recipe / method / bit widths,
  a SHA-256 :func:`checksum` of tensors and metadata). :func:`load_packed` verifies the
  checksum, rebuilds the packed layers (and the activation quantizers of
  :data:`ACT_QUANTIZERS`) in a float model of the same architecture and loads the tensors
  after validating version, layout, configuration, names, shapes and dtypes; every failure is
  one :class:`qtrain.errors.DataFileError` naming the file. Nothing is unpickled.
  Exactness: with ``scale_dtype=float32`` (default) the packed model reproduces the trained
  fake-quant model bit for bit for the formats listed exact in :mod:`qtrain.nn.packed_formats`
  and the uniform / LSQ / group-wise / power-of-two paths of :mod:`qtrain.nn.packers`; fp16
  codebooks (PQ / iPQ,
  Quant-Noise pq) are exact only for fp16-representable centroids. Tensors shared
  by several state-dict keys (tied weights) are written once; the metadata maps every alias
  to its source key and loading re-ties them. PQ layers left in the file are rebuilt in the
  float model (:func:`qtrain.nn.pq_layers.rebuild_pq_layers`, ties included).
"""

from qtrain.export_file import FILE_VERSION, checksum, save_packed, storage_bits
from qtrain.export_load import load_packed, load_run
from qtrain.export_pack import check_packable, pack_model
from qtrain.export_spec import ACT_QUANTIZERS, RUN_KEYS, packed_specs, run_info

__all__ = ["ACT_QUANTIZERS", "FILE_VERSION", "RUN_KEYS", "check_packable", "checksum",
           "load_packed", "load_run", "pack_model", "packed_specs", "run_info", "save_packed",
           "storage_bits"]
