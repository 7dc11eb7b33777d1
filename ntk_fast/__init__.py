from .flow import FlowResult, train  # noqa: F401  (gradient-flow trainer, issue 4)
