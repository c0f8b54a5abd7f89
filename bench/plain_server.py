"""The serving baseline of bench/serve_load.py: the same bundle behind one FastAPI/uvicorn process,
one request at a time (the handler runs the models synchronously on the event loop), every core
given to torch. Same decoding and answer code as the Serve app (ferray.predict).

    python -m bench.plain_server --bundle BUNDLE --port PORT
"""

import argparse


def make_app(bundle: str):
    import os

    import torch
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from ferray.bundle import load_bundle
    from ferray.faces import InputError
    from ferray.predict import answer_images, local_predictor

    torch.set_num_threads(os.cpu_count() or 1)
    ensemble, _ = load_bundle(bundle)
    predictor = local_predictor(ensemble)
    app = FastAPI()

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():  # the models load before the server starts listening
        return {"status": "ready"}

    @app.post("/predict")
    async def predict(request: Request, detect: bool = True):
        try:
            return answer_images([("body", await request.body())], predictor, ensemble.rule, detect)[0]
        except InputError as error:
            return JSONResponse({"error": str(error)}, status_code=error.status)

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(make_app(args.bundle), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
