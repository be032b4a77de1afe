"""Runs inside the managed vLLM server (loaded with vLLM's own ``--tool-parser-plugin`` flag): tool calls that
need no model-specific parser.

vLLM 0.32 calls tools only with a tool parser, and loads one only with ``--enable-auto-tool-choice``: without
it a chat request's ``tool_choice`` other than ``"none"`` is a 400, and a Responses request's tools are
silently ignored. Every built-in parser reads one model family's own call syntax. A named function or
``"required"`` needs none of that: vLLM constrains the answer to the tools' JSON schema (structured outputs)
and reads the call from that JSON, which any model can write. This parser does exactly that and refuses
``"auto"`` (also what ``tools`` without a ``tool_choice`` means), which only a model that writes its own calls,
with vLLM's parser for it, can honour: a clear 400 on ``tool_choice`` rather than an answer that silently never
calls a tool. Imports nothing but vLLM (it runs in vLLM's env).
"""

from vllm.entrypoints.generate.base.protocol import DeltaMessage, ExtractedToolCallInformation
from vllm.exceptions import VLLMValidationError
from vllm.tool_parsers.abstract_tool_parser import ToolParser, ToolParserManager


@ToolParserManager.register_module("vbatch_forced")  # the name vllm_server.FORCED_TOOL_CALL_ARGS gives the server
class ForcedToolCallParser(ToolParser):
    """Named and ``"required"`` tool choices through structured outputs (the base class's JSON path); ``"auto"``
    refused."""

    def adjust_request(self, request):
        if request.tools and request.tool_choice in ("auto", None):
            raise VLLMValidationError(
                'tool_choice "auto" (the default when tools are given) needs a model that writes its own tool '
                "calls and vLLM's tool parser for it (--enable-auto-tool-choice --tool-call-parser); this "
                'server forces calls only: name a function in tool_choice, or use "required"',
                parameter="tool_choice", value=request.tool_choice)
        return super().adjust_request(request)

    # vLLM asks a parser for the calls in a free answer only under "auto": refused above when there are tools, so
    # what is left (a Responses request, "auto" by default, with no tools) has none to call.
    def extract_tool_calls(self, model_output, request):
        return ExtractedToolCallInformation(tools_called=False, tool_calls=[], content=model_output)

    def extract_tool_calls_streaming(self, previous_text, current_text, delta_text, previous_token_ids,
                                     current_token_ids, delta_token_ids, request):
        return DeltaMessage(content=delta_text)
