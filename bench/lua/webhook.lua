-- POSTs pre-signed Meta webhooks from the file named by BENCH_BODIES (a Lua table).
package.path = package.path .. ";" .. os.getenv("BENCH_LUA_DIR") .. "/?.lua"
require "report"

local bodies = dofile(os.getenv("BENCH_BODIES"))
local counter = 0

request = function()
  counter = counter + 1
  local item = bodies[counter % #bodies + 1]
  return wrk.format("POST", "/webhook",
    {["Content-Type"] = "application/json", ["X-Hub-Signature-256"] = item[2]}, item[1])
end

-- BENCH_DELAY_MS paces each connection: it waits that long before each next request.
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
if delay_ms > 0 then
  delay = function() return delay_ms end
end

done = report
