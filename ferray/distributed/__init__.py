"""The Ray layer: every module of ferray that imports Ray (Data, Train, Tune, Serve), each a thin layer
over the Ray-free core above it. Nothing here is imported by the core."""
