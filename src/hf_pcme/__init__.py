"""hf_pcme: probabilistic cross-modal embeddings (PCME and relatives) for the Hugging Face ecosystem.

Importing the package registers ``"pcme"`` (and the built-in ``"pcme_bigru"`` text tower) with
``AutoConfig`` / ``AutoModel`` / ``AutoProcessor``, marks the classes for ``register_for_auto_class``
(so saved and pushed folders also load with ``trust_remote_code=True`` where ``hf_pcme`` is not
installed), and registers the ``"cross-modal-retrieval"`` pipeline.
"""

from transformers import AutoConfig, AutoModel, AutoProcessor

from .configuration_imram import IMRAMConfig
from .configuration_pcme import PCMEConfig
from .configuration_text_encoders import PCMEBiGRUConfig
from .configuration_textgcn import PCMETextGCNConfig
from .hub import push_to_hub
from .index import CrossModalIndex
from .modeling_imram import IMRAMModel, IMRAMOutput
from .modeling_pcme import PCMEModel, PCMEOutput, PCMEPreTrainedModel
from .outputs import LossOutput, ProbabilisticEmbedding
from .pipeline_cross_modal_retrieval import CrossModalRetrievalPipeline, register_pipeline
from .processing_pcme import PCMEProcessor
from .text_encoders import PCMEBiGRUModel
from .text_gcn import PCMETextGCNModel
from .tokenization import build_word_level_tokenizer

__version__ = "0.1.0"


def _register() -> None:
    AutoConfig.register(PCMEConfig.model_type, PCMEConfig, exist_ok=True)
    AutoConfig.register(PCMEBiGRUConfig.model_type, PCMEBiGRUConfig, exist_ok=True)
    AutoModel.register(PCMEConfig, PCMEModel, exist_ok=True)
    AutoModel.register(PCMEBiGRUConfig, PCMEBiGRUModel, exist_ok=True)
    AutoConfig.register(PCMETextGCNConfig.model_type, PCMETextGCNConfig, exist_ok=True)
    AutoModel.register(PCMETextGCNConfig, PCMETextGCNModel, exist_ok=True)
    AutoProcessor.register(PCMEConfig, PCMEProcessor, exist_ok=True)
    PCMEConfig.register_for_auto_class()
    AutoConfig.register(IMRAMConfig.model_type, IMRAMConfig, exist_ok=True)
    AutoModel.register(IMRAMConfig, IMRAMModel, exist_ok=True)
    IMRAMConfig.register_for_auto_class()
    IMRAMModel.register_for_auto_class("AutoModel")
    PCMEModel.register_for_auto_class("AutoModel")
    PCMEProcessor.register_for_auto_class("AutoProcessor")
    register_pipeline()
    from .auto_hooks import install

    install()  # "config.json not found in DIR" from AutoModel / pipeline


_register()

__all__ = [
    "CrossModalIndex",
    "CrossModalRetrievalPipeline",
    "IMRAMConfig",
    "IMRAMModel",
    "IMRAMOutput",
    "LossOutput",
    "PCMEBiGRUConfig",
    "PCMEBiGRUModel",
    "PCMEConfig",
    "PCMEModel",
    "PCMEOutput",
    "PCMEPreTrainedModel",
    "PCMEProcessor",
    "PCMETextGCNConfig",
    "PCMETextGCNModel",
    "ProbabilisticEmbedding",
    "build_word_level_tokenizer",
    "push_to_hub",
]
