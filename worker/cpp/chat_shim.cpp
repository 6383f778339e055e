// A C interface to llama.cpp's own chat code (common/chat.h), the code llama-server runs with
// `--jinja`: the model's Jinja template rendered with messages, tools and template arguments;
// the tool-call grammar and its lazy triggers; and the parser that splits the model's output
// into content, reasoning and tool calls.
//
// Every value crosses as JSON text, every returned string is malloc'ed (freed with
// lp_chat_string_free), and no C++ exception crosses the boundary: a failure is a non-zero
// status with the message in *out.

#include "llama.cpp/common/chat.h"
#include "llama.cpp/common/common.h"
#include "llama.cpp/common/json.h"
#include "llama.cpp/include/llama.h"

#include <cstdlib>
#include <cstring>
#include <exception>
#include <random>
#include <string>
#include <vector>

namespace {

char * dup_string(const std::string & value) {
    char * buffer = static_cast<char *>(std::malloc(value.size() + 1));
    if (!buffer) {
        return nullptr;
    }
    std::memcpy(buffer, value.data(), value.size());
    buffer[value.size()] = '\0';
    return buffer;
}

int fail(char ** out, const std::string & message) {
    *out = dup_string(message);
    return 1;
}

common_reasoning_format reasoning_format_of(const common_json & inputs) {
    if (!inputs.contains("reasoning_format") || !inputs.at("reasoning_format").is_string()) {
        return COMMON_REASONING_FORMAT_NONE;
    }
    return common_reasoning_format_from_name(inputs.at("reasoning_format").get<std::string>());
}

bool bool_of(const common_json & object, const char * key, bool fallback) {
    if (object.contains(key) && object.at(key).is_boolean()) {
        return object.at(key).get<bool>();
    }
    return fallback;
}

std::string string_of(const common_json & object, const char * key) {
    if (object.contains(key) && object.at(key).is_string()) {
        return object.at(key).get<std::string>();
    }
    return "";
}

// llama-server's tool-call ids: 32 random letters and digits.
std::string random_tool_call_id() {
    static const char alphabet[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    thread_local std::mt19937 rng{std::random_device{}()};
    std::uniform_int_distribution<size_t> pick(0, sizeof(alphabet) - 2);
    std::string id;
    for (int i = 0; i < 32; i++) {
        id += alphabet[pick(rng)];
    }
    return id;
}

common_json tool_call_json(const common_chat_tool_call & call) {
    common_json out = common_json::object();
    out["name"] = call.name;
    out["arguments"] = call.arguments;
    out["id"] = call.id;
    return out;
}

common_json message_json(const common_chat_msg & msg) {
    common_json out = common_json::object();
    out["content"] = msg.content;
    out["reasoning_content"] = msg.reasoning_content;
    common_json calls = common_json::array();
    for (const auto & call : msg.tool_calls) {
        calls.push_back(tool_call_json(call));
    }
    out["tool_calls"] = calls;
    return out;
}

common_json diff_json(const common_chat_msg_diff & diff) {
    common_json out = common_json::object();
    out["reasoning_content_delta"] = diff.reasoning_content_delta;
    out["content_delta"] = diff.content_delta;
    if (diff.tool_call_index != std::string::npos) {
        out["tool_call_index"] = static_cast<int64_t>(diff.tool_call_index);
        out["tool_call_delta"] = tool_call_json(diff.tool_call_delta);
    }
    return out;
}

}  // namespace

struct lp_chat {
    common_chat_templates_ptr templates;
};

// One request's output parser: the text so far, the message parsed from it, the ids given to
// its tool calls.
struct lp_chat_parser {
    common_chat_parser_params params;
    std::string text;
    common_chat_msg previous;
    std::vector<std::string> tool_call_ids;
};

extern "C" {

void lp_chat_string_free(char * ptr) {
    std::free(ptr);
}

// The chat templates of `model`, or of `template_override` (a template text, or a built-in
// name) when it is not empty.
int lp_chat_init(const llama_model * model, const char * template_override, lp_chat ** chat, char ** out) {
    *chat = nullptr;
    *out = nullptr;
    try {
        auto templates = common_chat_templates_init(model, template_override ? template_override : "");
        if (!templates) {
            return fail(out, "the chat template could not be loaded");
        }
        // Render once, so that a template the engine cannot run fails now and not on the
        // first request.
        common_chat_templates_inputs probe;
        common_chat_msg msg;
        msg.role = "user";
        msg.content = "hi";
        probe.messages.push_back(msg);
        common_chat_templates_apply(templates.get(), probe);
        *chat = new lp_chat{std::move(templates)};
        return 0;
    } catch (const std::exception & e) {
        return fail(out, e.what());
    } catch (...) {
        return fail(out, "unknown error");
    }
}

void lp_chat_free(lp_chat * chat) {
    delete chat;
}

// The template's source, as llama-server's /props reports it.
int lp_chat_source(const lp_chat * chat, char ** out) {
    try {
        *out = dup_string(common_chat_templates_source(chat->templates.get()));
        return 0;
    } catch (const std::exception & e) {
        return fail(out, e.what());
    }
}

// Renders a conversation. `inputs_json`: {messages (OpenAI's shape), tools, tool_choice,
// parallel_tool_calls, add_generation_prompt, continue_final_message, chat_template_kwargs
// (an object of JSON values), reasoning_format, enable_thinking, json_schema (text), grammar}.
// On success *out is {prompt, format, grammar, grammar_lazy, grammar_triggers[{type, value,
// token}], preserved_tokens, additional_stops, generation_prompt, parser, supports_thinking}.
int lp_chat_apply(const lp_chat * chat, const char * inputs_json, char ** out) {
    *out = nullptr;
    try {
        const auto body = common_json::parse(inputs_json);
        common_chat_templates_inputs inputs;
        inputs.messages = common_chat_msgs_parse_oaicompat(body.at("messages"));
        if (body.contains("tools") && !body.at("tools").is_null()) {
            inputs.tools = common_chat_tools_parse_oaicompat(body.at("tools"));
        }
        const std::string tool_choice = string_of(body, "tool_choice");
        if (!tool_choice.empty()) {
            inputs.tool_choice = common_chat_tool_choice_parse_oaicompat(tool_choice);
        }
        const auto caps = common_chat_templates_get_caps(chat->templates.get());
        const auto parallel = caps.find("supports_parallel_tool_calls");
        inputs.parallel_tool_calls = bool_of(body, "parallel_tool_calls", parallel != caps.end() && parallel->second);
        inputs.add_generation_prompt = bool_of(body, "add_generation_prompt", true);
        if (body.contains("continue_final_message") && !body.at("continue_final_message").is_null()) {
            inputs.continue_final_message = common_chat_continuation_parse(body.at("continue_final_message"));
        }
        inputs.use_jinja = bool_of(body, "use_jinja", true);
        inputs.reasoning_format = reasoning_format_of(body);
        // llama-server: thinking is on where the template supports it unless `--reasoning
        // off`, and the template argument `enable_thinking` decides over both.
        inputs.enable_thinking = bool_of(body, "enable_thinking", true) &&
                                 common_chat_templates_support_enable_thinking(chat->templates.get());
        inputs.json_schema = string_of(body, "json_schema");
        inputs.grammar = string_of(body, "grammar");
        inputs.add_bos = bool_of(body, "add_bos", false);
        inputs.add_eos = bool_of(body, "add_eos", false);
        // llama-server's default template arguments: `--reasoning-preserve` (on by default).
        inputs.chat_template_kwargs["preserve_reasoning"] = bool_of(body, "preserve_reasoning", true) ? "true" : "false";
        if (body.contains("chat_template_kwargs") && body.at("chat_template_kwargs").is_object()) {
            for (const auto & item : body.at("chat_template_kwargs").items()) {
                inputs.chat_template_kwargs[item.key()] = item.value().dump();
            }
            const auto thinking = inputs.chat_template_kwargs.find("enable_thinking");
            if (thinking != inputs.chat_template_kwargs.end()) {
                if (thinking->second == "true") {
                    inputs.enable_thinking = true;
                } else if (thinking->second == "false") {
                    inputs.enable_thinking = false;
                }
            }
        }
        const auto params = common_chat_templates_apply(chat->templates.get(), inputs);
        common_json result = common_json::object();
        result["prompt"] = params.prompt;
        result["format"] = static_cast<int64_t>(params.format);
        result["grammar"] = params.grammar;
        result["grammar_lazy"] = params.grammar_lazy;
        common_json triggers = common_json::array();
        for (const auto & trigger : params.grammar_triggers) {
            common_json t = common_json::object();
            t["type"] = static_cast<int64_t>(trigger.type);
            t["value"] = trigger.value;
            t["token"] = static_cast<int64_t>(trigger.token);
            triggers.push_back(t);
        }
        result["grammar_triggers"] = triggers;
        result["preserved_tokens"] = params.preserved_tokens;
        result["additional_stops"] = params.additional_stops;
        result["generation_prompt"] = params.generation_prompt;
        result["parser"] = params.parser;
        result["supports_thinking"] = params.supports_thinking;
        *out = dup_string(result.dump());
        return *out ? 0 : 1;
    } catch (const std::exception & e) {
        return fail(out, e.what());
    } catch (...) {
        return fail(out, "unknown error");
    }
}

// A parser for one request's output. `params_json`: {format, reasoning_format,
// reasoning_in_content, generation_prompt, parse_tool_calls, is_continuation, parser}.
int lp_chat_parser_new(const char * params_json, lp_chat_parser ** parser, char ** out) {
    *parser = nullptr;
    *out = nullptr;
    try {
        const auto body = common_json::parse(params_json);
        auto created = new lp_chat_parser();
        auto & params = created->params;
        params.format = static_cast<common_chat_format>(body.at("format").get<int64_t>());
        params.reasoning_format = reasoning_format_of(body);
        params.reasoning_in_content = bool_of(body, "reasoning_in_content", false);
        params.generation_prompt = string_of(body, "generation_prompt");
        params.parse_tool_calls = bool_of(body, "parse_tool_calls", true);
        params.is_continuation = bool_of(body, "is_continuation", false);
        const std::string arena = string_of(body, "parser");
        if (!arena.empty()) {
            params.parser.load(arena);
        }
        if (params.is_continuation) {
            created->previous = common_chat_parse("", true, params);
        }
        *parser = created;
        return 0;
    } catch (const std::exception & e) {
        return fail(out, e.what());
    } catch (...) {
        return fail(out, "unknown error");
    }
}

void lp_chat_parser_free(lp_chat_parser * parser) {
    delete parser;
}

// Appends `len` bytes of output to the parser's text and parses it all again (`is_partial`
// until the generation ended). *out is {message, diffs}: the message so far and what changed
// since the last call, in llama-server's diff shape.
int lp_chat_parser_feed(lp_chat_parser * parser, const char * text, size_t len, bool is_partial, char ** out) {
    *out = nullptr;
    try {
        parser->text.append(text, len);
        auto msg = common_chat_parse(parser->text, is_partial, parser->params);
        msg.set_tool_call_ids(parser->tool_call_ids, random_tool_call_id);
        common_json diffs = common_json::array();
        for (const auto & diff : common_chat_msg_diff::compute_diffs(parser->previous, msg)) {
            diffs.push_back(diff_json(diff));
        }
        parser->previous = msg;
        common_json result = common_json::object();
        result["message"] = message_json(msg);
        result["diffs"] = diffs;
        *out = dup_string(result.dump());
        return *out ? 0 : 1;
    } catch (const std::exception & e) {
        return fail(out, e.what());
    } catch (...) {
        return fail(out, "unknown error");
    }
}

}  // extern "C"
