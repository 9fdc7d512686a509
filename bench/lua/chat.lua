-- POSTs FAQ-bot chat messages from 5,000 users with varied texts.
package.path = package.path .. ";" .. os.getenv("BENCH_LUA_DIR") .. "/?.lua"
require "report"

local texts = {
  "hello there", "what are your opening hours?", "how much is the pro plan",
  "my delivery is late, where is my package", "I want a refund please",
  "I forgot my password", "can I talk to a human", "thanks, that solved it", "bye",
  "the app crashed again and I lost my order"
}
local counter = 0

request = function()
  counter = counter + 1
  local body = string.format('{"user_id": "user-%d", "message": "%s"}',
    counter % 5000, texts[counter % #texts + 1])
  return wrk.format("POST", "/chat", {["Content-Type"] = "application/json"}, body)
end

-- BENCH_DELAY_MS paces each connection: it waits that long before each next request.
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
if delay_ms > 0 then
  delay = function() return delay_ms end
end

done = report
