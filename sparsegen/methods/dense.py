"""Dense attention through the plugin: every layer and step runs the model's own attention.

Useful as a control (outputs equal the unpatched pipeline) and to measure the plugin's
overhead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import MethodConfig, SparseAttentionMethod


@dataclass(frozen=True)
class DenseConfig(MethodConfig):
    method: ClassVar[str] = "dense"

    def layer_is_dense(self, layer: int) -> bool:
        return True


class DenseMethod(SparseAttentionMethod):
    config_cls = DenseConfig

    def attention(self, q, k, v, call):  # never reached: every layer is dense
        raise RuntimeError("DenseMethod.attention should not be called; dense layers use the model's attention")

