"""The one error a request can end in: OpenAI's error body, {"error": {"message", "type", "param",
"code"}}, with its HTTP status."""

from fastapi.responses import JSONResponse


class APIError(Exception):
    def __init__(self, status: int, message: str, param=None, code=None, kind="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind, self.headers = status, message, param, code, kind, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)
