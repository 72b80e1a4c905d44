"""hf_ggda: Generalized Group Data Attribution for the Hugging Face stack."""

__version__ = "0.1.0"

SIGN_CONVENTION = (
    "positive score = the group helps the query (removing it would raise the query's loss)"
)
