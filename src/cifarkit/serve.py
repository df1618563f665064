"""`cifarkit serve`: a web page to try a model and a small JSON API (FastAPI + uvicorn).

    GET  /          the page: pick or drop images, see the top classes as bars, and a model card
    POST /predict   multipart "file" (one or more) -> the same JSON as `cifarkit predict --json`
    GET  /health    {"status": "ok"}
    GET  /model     the model card

Everything is served from this package (no CDN), so it works offline.
"""

from importlib import resources

from .errors import CifarkitError

MAX_UPLOAD_BYTES = 10 * 1024 * 1024


def create_app(predictor, top_k: int = 3, max_bytes: int = MAX_UPLOAD_BYTES):
    try:
        from fastapi import FastAPI, File, HTTPException, UploadFile
        from fastapi.responses import HTMLResponse
    except ImportError:
        raise CifarkitError("`cifarkit serve` needs FastAPI and uvicorn", "pip install 'cifarkit[serve]'")

    app = FastAPI(title="cifarkit", docs_url="/docs", redoc_url=None)
    page = resources.files("cifarkit").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/model")
    def model_card():
        return predictor.card

    @app.post("/predict")
    def predict(file: list[UploadFile] = File(...)):
        results = []
        for f in file:
            data = f.file.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise HTTPException(413, f"{f.filename}: larger than {max_bytes // (1024 * 1024)} MB")
            if not data:
                raise HTTPException(400, f"{f.filename}: empty upload")
            try:
                top = predictor.predict_bytes(data, top_k)
            except CifarkitError as exc:
                raise HTTPException(400, f"{f.filename}: {exc.message}")
            results.append({"path": f.filename, "top": top})
        return results

    return app


def load_predictor(path: str, model=None):
    if str(path).endswith(".onnx"):
        from .export import OnnxPredictor
        return OnnxPredictor(path)
    from .checkpoint import load_checkpoint
    from .predict import Predictor
    return Predictor(load_checkpoint(path, model=model), "cpu")


def serve(path: str, host: str = "127.0.0.1", port: int = 8000, top_k: int = 3, model=None):
    try:
        import uvicorn
    except ImportError:
        raise CifarkitError("`cifarkit serve` needs FastAPI and uvicorn", "pip install 'cifarkit[serve]'")
    app = create_app(load_predictor(path, model), top_k)
    print(f"serving {path} on http://{host}:{port}/  (Ctrl-C to stop)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
