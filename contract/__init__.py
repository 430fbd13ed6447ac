"""The model contract shared by training and serving: the model card (`contract.card`), the
preprocessing rule and its one implementation (`contract.preprocess`), and the runtime backends
(`contract.runtime`). numpy, Pillow, pydantic and LiteRT only; it imports neither `app` nor
`training`, and both import it."""
